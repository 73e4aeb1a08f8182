"""Every real driving video, every frame: the face is found in (almost) all of them and smoothing lowers jitter
on a still head. (Features of every video: test_expression_driving_features.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flashportrait_core.expression import iter_video_chunks, probe_video
from flashportrait_core.expression.extract import stabilize_track, track_faces
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from flashportrait_core.expression.smoothing import face_sizes, point_jitter

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"
VIDEOS = sorted(path.name for path in DRIVING.glob("*.mp4"))
STILL_FRAMES = 30
SMOOTHING = 0.5  # the nodes' default


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


def stillest_stretch(boxes: np.ndarray, length: int = STILL_FRAMES) -> slice:
    """The `length` frames where the face box's centre moves least (relative to its size): a still head."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    motion = np.linalg.norm(np.diff(centres, axis=0), axis=1) / face_sizes(boxes)[1:]
    start = int(np.argmin(np.convolve(motion, np.ones(length - 1), mode="valid")))
    return slice(start, start + length)


def test_all_driving_videos_are_here() -> None:
    assert len(VIDEOS) == 13 and "lp_s13.mp4" in VIDEOS


@pytest.mark.parametrize("name", VIDEOS)
def test_face_found_in_every_frame_and_smoothing_lowers_jitter(backend: MediaPipeFaceBackend, name: str) -> None:
    info = probe_video(DRIVING / name)
    chunks = (torch.from_numpy(chunk) for chunk in iter_video_chunks(DRIVING / name, 64))
    track = track_faces(chunks, backend)  # every frame, streamed as extraction does
    assert track.found.shape[0] == info.frame_count
    assert track.found.mean() >= 0.99, f"{name}: face found in {track.found.mean():.1%} of frames"
    raw = stabilize_track(track, info.fps, 0.0)
    smoothed = stabilize_track(track, info.fps, SMOOTHING)
    still = stillest_stretch(raw.boxes)
    jitter_raw = point_jitter(raw.points[still], raw.boxes[still])
    jitter_smoothed = point_jitter(smoothed.points[still], smoothed.boxes[still])
    assert jitter_smoothed < jitter_raw, f"{name}: jitter {jitter_smoothed:.5f} smoothed vs {jitter_raw:.5f} raw"
    # Smoothing keeps the points on the face: on average within 2% of its size of the detections.
    offset = np.linalg.norm(smoothed.points - raw.points, axis=-1).mean(axis=-1) / face_sizes(raw.boxes)
    assert offset.mean() < 0.02
