"""Umeyama similarity and the 224x224 face crop warp."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flashportrait_core.expression import (
    align_face_crops,
    read_video_frames,
    similarity_to_template,
    template_points,
    umeyama_similarity,
)
from flashportrait_core.expression.alignment import apply_affine
from flashportrait_core.expression.extract import to_uint8

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


def _similarity(angle: float, scale: float, tx: float, ty: float) -> torch.Tensor:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float64)


def test_template_points() -> None:
    points = template_points()
    assert points.shape == (5, 2)
    torch.testing.assert_close(points[0], torch.tensor([0.3843 * 224, 0.27 * 224]))
    torch.testing.assert_close(points[4], torch.tensor([0.5977 * 224, 0.525 * 224]))
    assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]  # left = image left


def test_umeyama_recovers_known_similarities_in_a_batch() -> None:
    generator = torch.Generator().manual_seed(3)
    source = torch.rand(3, 5, 2, generator=generator, dtype=torch.float64) * 400
    truths = torch.stack([
        _similarity(0.3, 0.5, 10.0, -20.0),
        _similarity(2.8, 1.7, -100.0, 35.5),  # beyond 90 degrees
        _similarity(-1.2, 0.2, 0.0, 0.0),
    ])
    target = apply_affine(source, truths)
    estimated = umeyama_similarity(source, target)
    torch.testing.assert_close(estimated, truths, atol=1e-9, rtol=0)


def test_umeyama_never_returns_a_reflection() -> None:
    source = template_points(dtype=torch.float64)[None] * 2 + 7
    mirrored = source.clone()
    mirrored[..., 0] = -mirrored[..., 0]  # best orthogonal fit is a reflection
    estimated = umeyama_similarity(mirrored, source[0])
    determinant = torch.linalg.det(estimated[:, :, :2])
    assert determinant.item() > 0
    # Rotation times scale: the linear part has equal singular values.
    singular = torch.linalg.svdvals(estimated[0, :, :2])
    torch.testing.assert_close(singular[0], singular[1])


def test_similarity_to_template_maps_template_to_itself() -> None:
    identity = similarity_to_template(template_points()[None])
    torch.testing.assert_close(identity, torch.eye(2, 3)[None], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[B, 5, 2\]"):
        similarity_to_template(torch.zeros(1, 68, 2))
    with pytest.raises(ValueError, match="NaN"):
        similarity_to_template(torch.full((1, 5, 2), float("nan")))
    with pytest.raises(ValueError, match="degenerate"):
        similarity_to_template(torch.ones(1, 5, 2))


def test_warp_moves_pixels_like_the_matrix() -> None:
    frames = torch.zeros(1, 300, 400, 3)
    frames[0, 120, 250] = 1.0  # a single bright pixel at x=250, y=120
    matrix = _similarity(0.0, 0.5, -20.0, 40.0).float()[None]
    crop = align_face_crops(frames, matrix)
    assert crop.shape == (1, 3, 224, 224)
    assert crop.min() == -1.0  # outside the frame is black
    y, x = divmod(int(crop[0, 0].argmax()), 224)
    assert (x, y) == (0.5 * 250 - 20, 0.5 * 120 + 40)


def test_aligned_real_frame_puts_points_on_the_template() -> None:
    from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

    frames, _ = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=1)
    with MediaPipeFaceBackend() as backend:
        points = torch.from_numpy(backend.detect(to_uint8(frames)).points)
        transforms = similarity_to_template(points)
        crops = align_face_crops(frames, transforms)
        assert crops.shape == (1, 3, 224, 224) and crops.min() >= -1 and crops.max() <= 1
        # Detect again on the crop itself: the face points land where the matrix sends them ...
        on_crop = backend.detect(to_uint8((crops.permute(0, 2, 3, 1) + 1) / 2))
    assert on_crop.found.all()
    expected = apply_affine(points, transforms)
    assert np.abs(on_crop.points - expected.numpy()).max() < 2.0
    # ... which is the template up to the least-squares residual of a 5-point similarity.
    assert (torch.from_numpy(on_crop.points) - template_points()).norm(dim=-1).max() < 8.0


def test_align_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        align_face_crops(torch.zeros(1, 3, 64, 64), torch.eye(2, 3)[None])
    with pytest.raises(ValueError, match=r"\[2, 2, 3\]"):
        align_face_crops(torch.zeros(2, 64, 64, 3), torch.eye(2, 3)[None])
