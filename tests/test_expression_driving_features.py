"""Every real driving video through the real-size encoder: finite features; the same input, the same features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashportrait_core.expression import (
    extract_expression_features_from_video,
    iter_video_chunks,
    load_fan_encoder,
    probe_video,
    random_fan_encoder_state_dict,
    similarity_to_template,
)
from flashportrait_core.expression.extract import align_chunk
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from flashportrait_core.expression.pdfgc import expression_features

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"
VIDEOS = sorted(path.name for path in DRIVING.glob("*.mp4"))


@pytest.fixture(scope="module")
def backend() -> MediaPipeFaceBackend:
    with MediaPipeFaceBackend() as face_backend:
        yield face_backend


@pytest.fixture(scope="module")
def encoder():
    return load_fan_encoder(random_fan_encoder_state_dict(seed=0))


def test_features_are_finite_for_every_video(backend: MediaPipeFaceBackend, encoder) -> None:
    """One frame of each video (its middle) through detection, alignment and the real-size encoder."""
    crops = []
    for name in VIDEOS:
        middle = probe_video(DRIVING / name).frame_count // 2
        *_, last_chunk = iter_video_chunks(DRIVING / name, 64, max_frames=middle + 1)
        chunk = torch.from_numpy(last_chunk[-1:])
        track = backend.detect(chunk.numpy())
        assert track.found.all(), name
        transforms = similarity_to_template(torch.from_numpy(track.points).to(torch.float64))
        crops.append(align_chunk(chunk, transforms, torch.device("cpu")))
    features = expression_features(encoder, torch.cat(crops))
    assert features.shape == (len(VIDEOS), 554)
    assert torch.isfinite(features).all()
    assert (features.std(dim=0) > 0).any()  # different faces, different features


def test_identical_input_gives_identical_features(backend: MediaPipeFaceBackend, encoder) -> None:
    runs = [extract_expression_features_from_video(DRIVING / "lp_s13.mp4", encoder, backend, batch_size=2,
                                                   smoothing=0.5, max_frames=3, target_fps=25.0)
            for _ in range(2)]
    assert torch.equal(runs[0].features, runs[1].features)
    assert torch.equal(runs[0].points, runs[1].points) and torch.equal(runs[0].boxes, runs[1].boxes)
