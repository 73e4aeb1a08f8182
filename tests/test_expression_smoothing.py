"""Temporal smoothing of face points: the one-euro filter, and jitter on a still head in a real video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flashportrait_core.expression import read_video_frames
from flashportrait_core.expression.extract import stabilize_track, to_uint8
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from flashportrait_core.expression.smoothing import (
    face_sizes,
    one_euro_pass,
    point_jitter,
    settings_for_strength,
    smooth_sequence,
)

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


def test_strength_maps_to_settings() -> None:
    assert settings_for_strength(0.0) is None
    weak, medium, strong = (settings_for_strength(s) for s in (0.1, 0.5, 1.0))
    # Stronger: lower cutoff for a still face, less opening with speed.
    assert weak.min_cutoff_hz > medium.min_cutoff_hz > strong.min_cutoff_hz > 0
    assert weak.beta > medium.beta > strong.beta > 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 \\(off\\) and 1"):
            settings_for_strength(bad)


def test_off_single_frame_and_constant_are_unchanged() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(20, 5, 2)).astype(np.float32)
    sizes = np.full(20, 100.0)
    assert np.array_equal(smooth_sequence(values, sizes, 25.0, 0.0), values)
    assert np.array_equal(smooth_sequence(values[:1], sizes[:1], 25.0, 1.0), values[:1])
    constant = np.full((30, 5, 2), 42.5, dtype=np.float32)
    np.testing.assert_allclose(smooth_sequence(constant, np.full(30, 80.0), 30.0, 1.0), constant, rtol=0, atol=1e-4)
    smoothed = smooth_sequence(values, sizes, 25.0, 0.5)
    assert smoothed.dtype == np.float32 and smoothed.shape == values.shape


def test_noise_on_a_still_point_is_reduced_and_stronger_reduces_more() -> None:
    rng = np.random.default_rng(1)
    still = 200.0 + rng.normal(scale=1.5, size=(120, 5, 2))  # 1.5 px jitter on a 200 px face
    boxes = np.tile([100.0, 100.0, 300.0, 300.0], (120, 1))
    raw = point_jitter(still, boxes)
    jitters = [point_jitter(smooth_sequence(still, face_sizes(boxes), 30.0, s), boxes) for s in (0.25, 0.5, 1.0)]
    assert jitters[0] < 0.6 * raw
    assert jitters[0] > jitters[1] > jitters[2]


def test_forward_backward_has_no_lag_on_a_ramp() -> None:
    # A head sweeping at half a face size per second: a causal filter trails behind, the zero-lag one does not.
    frames, fps, size = 90, 30.0, 200.0
    ramp = (np.arange(frames) * 0.5 * size / fps)[:, None]
    sizes = np.full(frames, size)
    settings = settings_for_strength(1.0)
    causal = one_euro_pass(ramp, sizes, fps, settings)
    zero_lag = smooth_sequence(ramp, sizes, fps, 1.0)
    middle = slice(30, 60)
    causal_lag = np.abs(causal[middle] - ramp[middle]).mean()
    assert causal_lag > 1.0  # pixels behind
    assert np.abs(zero_lag[middle] - ramp[middle]).mean() < 0.2 * causal_lag


def test_fast_motion_passes_weak_smoothing() -> None:
    # A jump of half a face within 3 frames (a quick turn): weak smoothing stays close, strong trails more.
    frames, size = 60, 200.0
    signal = np.where(np.arange(frames) < 30, 0.0, 100.0)[:, None]
    signal[29:32, 0] = [0.0, 33.0, 66.0]
    sizes = np.full(frames, size)
    errors = [np.abs(smooth_sequence(signal, sizes, 30.0, s) - signal).max() for s in (0.1, 1.0)]
    assert errors[0] < 0.5 * errors[1]


def test_rejects_unfilled_gaps_and_bad_rates() -> None:
    values = np.zeros((4, 5, 2))
    values[2] = np.nan
    with pytest.raises(ValueError, match="fill gaps first"):
        smooth_sequence(values, np.full(4, 50.0), 25.0, 0.5)
    with pytest.raises(ValueError, match="fps"):
        smooth_sequence(np.zeros((4, 5, 2)), np.full(4, 50.0), 0.0, 0.5)
    with pytest.raises(ValueError, match="one face size per frame"):
        smooth_sequence(np.zeros((4, 5, 2)), np.full(3, 50.0), 25.0, 0.5)


def test_jitter_on_a_still_head_of_a_real_video_is_lower_with_smoothing() -> None:
    # lp_d19 (30 fps): the head is nearly still from frame 60 to 90 (box centre moves < 0.1% of its size a frame).
    frames, fps = read_video_frames(DRIVING / "lp_d19.mp4", max_frames=100)
    with MediaPipeFaceBackend() as backend:
        track = backend.detect(to_uint8(frames[50:100]))
    assert track.found.all()
    still = slice(10, 40)
    raw = stabilize_track(track, fps, 0.0)
    jitter_raw = point_jitter(raw.points[still], raw.boxes[still])
    jitters = {}
    for strength in (0.25, 0.5, 1.0):
        smoothed = stabilize_track(track, fps, strength)
        jitters[strength] = point_jitter(smoothed.points[still], smoothed.boxes[still])
        # The smoothed points stay on the face: within 3% of its size of the raw detections.
        offset = np.linalg.norm(smoothed.points - raw.points, axis=-1).max()
        assert offset < 0.03 * face_sizes(raw.boxes).mean()
    assert jitter_raw > 0  # the detector does jitter on a still head
    assert jitters[0.25] < 0.85 * jitter_raw
    assert jitters[0.25] > jitters[0.5] > jitters[1.0]
