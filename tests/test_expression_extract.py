"""Driving frames -> [T, 554] expression features, with gap filling, chunking and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flashportrait_core.expression import (
    FaceTrack,
    extract_expression_features,
    load_fan_encoder,
    random_fan_encoder_state_dict,
    read_video_frames,
)
from flashportrait_core.expression.extract import fill_missing, rgb_chunk
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def encoder():
    return load_fan_encoder(random_fan_encoder_state_dict(seed=7))


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.fixture(scope="module")
def real_frames() -> torch.Tensor:
    frames, _ = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=3)
    return frames


def test_fill_missing_interpolates_and_holds_ends() -> None:
    values = np.full((6, 2), np.nan, dtype=np.float32)
    found = np.array([False, True, False, False, True, False])
    values[1], values[4] = (10.0, 0.0), (40.0, 3.0)
    filled = fill_missing(values, found)
    np.testing.assert_allclose(filled[:, 0], [10, 10, 20, 30, 40, 40])
    np.testing.assert_allclose(filled[:, 1], [0, 0, 1, 2, 3, 3])
    assert filled.dtype == np.float32


def test_frame_without_face_is_filled_and_reported(encoder, backend, real_frames: torch.Tensor) -> None:
    blank = torch.zeros(1, *real_frames.shape[1:])
    frames = torch.cat([real_frames[:2], blank, real_frames[2:]])  # no face at index 2
    progress: list[tuple[int, int]] = []
    stops: list[int] = []
    result = extract_expression_features(
        frames, encoder, backend, batch_size=2,
        on_progress=lambda done, total: progress.append((done, total)),
        should_stop=lambda: stops.append(1),
    )
    assert result.features.shape == (4, 554) and result.features.dtype == torch.float32
    assert torch.isfinite(result.features).all()
    assert result.found.tolist() == [True, True, False, True]
    assert result.filled_frames == [2]
    torch.testing.assert_close(result.points[2], (result.points[1] + result.points[3]) / 2)
    torch.testing.assert_close(result.boxes[2], (result.boxes[1] + result.boxes[3]) / 2)
    assert result.points.shape == (4, 5, 2) and result.boxes.shape == (4, 4)
    # Two chunks of detection, then two of encoding; each frame counts once per stage.
    assert progress == [(2, 8), (4, 8), (6, 8), (8, 8)]
    assert len(stops) == 4
    # The filled frame is encoded from its (black) aligned crop: its features differ from its neighbours'.
    assert (result.features[2] - result.features[1]).abs().max() > 1e-3


def test_no_face_anywhere_is_a_clear_error(encoder, backend) -> None:
    frames = torch.zeros(3, 96, 128, 3)
    frames[1] = torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no face found in any of the 3 driving frames"):
        extract_expression_features(frames, encoder, backend)


def test_should_stop_interrupts_between_chunks(encoder, backend, real_frames: torch.Tensor) -> None:
    calls: list[int] = []

    def stop_on_second_chunk() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        extract_expression_features(real_frames, encoder, backend, batch_size=2, should_stop=stop_on_second_chunk)


class ScriptedBackend:
    """Reports fixed points, so the encoder path is tested without a detector."""

    def __init__(self, track: FaceTrack) -> None:
        self.track = track
        self.seen: list[np.ndarray] = []

    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack:
        self.seen.append(frames_uint8)
        return self.track


def test_grey_and_rgba_frames_are_converted(encoder) -> None:
    track = FaceTrack(
        points=np.array([[[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]]], dtype=np.float32),
        boxes=np.array([[20, 20, 100, 110]], dtype=np.float32),
        found=np.array([True]),
    )
    grey = torch.rand(1, 128, 128, 1, generator=torch.Generator().manual_seed(1))
    rgba = torch.cat([grey.expand(-1, -1, -1, 3), torch.full_like(grey, 0.5)], dim=-1)
    features = []
    for frames in (grey, rgba):
        backend = ScriptedBackend(track)
        features.append(extract_expression_features(frames, encoder, backend).features)
        assert backend.seen[0].shape == (1, 128, 128, 3) and backend.seen[0].dtype == np.uint8
    # Grey repeated to RGB and RGBA with alpha dropped are the same image.
    torch.testing.assert_close(features[0], features[1])


def test_rgb_chunk_checks_values() -> None:
    frames = torch.rand(3, 8, 8, 3)
    assert torch.equal(rgb_chunk(frames, 0, 3), frames)
    overshoot = frames.clone()
    overshoot[0, 0, 0, 0] = 1.05  # bicubic resampling overshoot is clamped
    assert rgb_chunk(overshoot, 0, 1).max() == 1.0
    with pytest.raises(ValueError, match="divide 0-255 images by 255"):
        rgb_chunk(frames * 255, 0, 3)
    broken = frames.clone()
    broken[2, 1, 1, 1] = float("nan")
    rgb_chunk(broken, 0, 2)  # only the chunk asked for is checked
    with pytest.raises(ValueError, match="frames 2..2 contain NaN"):
        rgb_chunk(broken, 2, 3)


def test_rejects_bad_frames(encoder, backend) -> None:
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        extract_expression_features(torch.rand(3, 3, 64, 64), encoder, backend)
    with pytest.raises(ValueError, match=r"frames.float\(\) / 255"):
        extract_expression_features(torch.zeros(2, 64, 64, 3, dtype=torch.uint8), encoder, backend)
    with pytest.raises(ValueError, match="at least one driving frame"):
        extract_expression_features(torch.zeros(0, 64, 64, 3), encoder, backend)
    with pytest.raises(TypeError, match="torch.Tensor"):
        extract_expression_features(np.zeros((2, 64, 64, 3), np.float32), encoder, backend)
    with pytest.raises(ValueError, match="batch_size"):
        extract_expression_features(torch.zeros(2, 64, 64, 3), encoder, backend, batch_size=0)
