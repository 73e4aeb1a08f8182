"""Previews: face boxes and points drawn over real frames, expression curves plotted as an image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from flashportrait_core.expression import extract_expression_features, read_video_frames, resample_expressions
from flashportrait_core.expression.extract import ExpressionFeatures
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from flashportrait_core.expression.preview import (
    FILLED_COLOUR,
    FOUND_COLOUR,
    LANDMARK_COLOUR,
    POINT_COLOURS,
    draw_face_overlay,
    expression_curves,
    face_tracks_for_frames,
    landmarks_for_frames,
    plot_expression_curves,
)

from small_encoder import SmallEncoder  # noqa: E402

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


@pytest.fixture(scope="module")
def real() -> tuple[torch.Tensor, ExpressionFeatures]:
    frames, fps = read_video_frames(DRIVING / "lp_d3.mp4", max_frames=7)  # 30 fps
    frames[3] = 0.0  # a frame without a face: its points get interpolated
    with MediaPipeFaceBackend() as backend:
        expressions = extract_expression_features(frames, SmallEncoder().eval(), backend, batch_size=4, fps=fps)
    assert expressions.filled_frames == [3]
    return frames, expressions


def _colour_at(image: torch.Tensor, x: float, y: float) -> tuple[float, ...]:
    return tuple(round(v, 3) for v in image[int(round(y)), int(round(x))].tolist())


def test_overlay_draws_boxes_and_points(real) -> None:
    frames, expressions = real
    boxes, points, found = face_tracks_for_frames(expressions, 7, 512, 512)
    overlay = draw_face_overlay(frames, boxes, points, found)
    assert overlay.shape == frames.shape and overlay.dtype == torch.float32
    for index in (0, 3):
        x0, y0, x1, y1 = boxes[index].tolist()
        colour = FOUND_COLOUR if index == 0 else FILLED_COLOUR
        middle_x = (x0 + x1) / 2
        assert _colour_at(overlay[index], middle_x, y0) == pytest.approx(colour, abs=1e-3)
        assert _colour_at(overlay[index], x1, (y0 + y1) / 2) == pytest.approx(colour, abs=1e-3)
        assert _colour_at(overlay[index], *points[index, 2].tolist()) == pytest.approx(POINT_COLOURS[2], abs=1e-3)
    # Away from the drawing the picture is untouched, and the input is not modified.
    assert torch.equal(overlay[0, :5, :5], frames[0, :5, :5])
    assert not torch.equal(overlay, frames)
    grey = draw_face_overlay(frames[:1, :, :, :1], boxes[:1], points[:1], found[:1])
    assert grey.shape == (1, 512, 512, 3)


def _is_colour(image: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    """[H, W] mask of the pixels that have exactly this colour."""
    return (image - torch.tensor(colour)).abs().max(dim=-1).values < 1e-6


def test_overlay_draws_the_dense_landmarks(real) -> None:
    frames, expressions = real
    landmarks = landmarks_for_frames(expressions, 7, 512, 512)
    # MediaPipe's refined face mesh: 478 points per frame, NaN on the frame without a face (3).
    assert landmarks.shape == (7, 478, 2)
    assert torch.isnan(landmarks[3]).all() and torch.isfinite(landmarks[[0, 1, 2, 4, 5, 6]]).all()
    boxes, points, found = face_tracks_for_frames(expressions, 7, 512, 512)
    # The 5 alignment points are mesh points (before smoothing, which is off here).
    torch.testing.assert_close(points[0, 2], landmarks[0, 1])
    overlay = draw_face_overlay(frames, boxes, points, found, landmarks)
    plain = draw_face_overlay(frames, boxes, points, found)
    for index in (0, 6):
        pixels = landmarks[index].round().long()
        cyan = _is_colour(overlay[index], LANDMARK_COLOUR)
        drawn = cyan[pixels[:, 1], pixels[:, 0]]
        # Every landmark pixel is cyan except the few under the 5 points and the box drawn over them.
        assert drawn.float().mean() > 0.9
        # Nothing else changes: one-pixel dots at 512x512, at the landmark pixels only.
        changed = (overlay[index] != plain[index]).any(dim=-1)
        landmark_pixels = {(x, y) for x, y in pixels.tolist()}
        assert {(x, y) for y, x in changed.nonzero().tolist()} <= landmark_pixels
        assert int(changed.sum()) > 400
        assert cyan[changed].all()
    assert torch.equal(overlay[3], plain[3])  # no face, no landmarks drawn
    # Frames shown at half size: landmarks scale with them.
    torch.testing.assert_close(landmarks_for_frames(expressions, 7, 256, 256)[0], landmarks[0] / 2)
    with pytest.raises(ValueError, match=r"landmarks must have shape \[7, K, 2\]"):
        draw_face_overlay(frames, boxes, points, found, landmarks[:2])


def test_landmarks_survive_frame_rate_conversion(real) -> None:
    _, expressions = real
    converted = resample_expressions(expressions, 15.0)  # every other 30 fps frame: 0, 2, 4, 6
    torch.testing.assert_close(converted.landmarks, expressions.landmarks[[0, 2, 4, 6]], equal_nan=True)
    half_way = resample_expressions(expressions, 20.0)  # positions 0, 1.5, 3, 4.5: 3 has no face
    assert torch.isfinite(half_way.landmarks[[0, 1]]).all() and torch.isnan(half_way.landmarks[2]).all()
    torch.testing.assert_close(half_way.landmarks[1], (expressions.landmarks[1] + expressions.landmarks[2]) / 2)


def test_tracks_follow_resampled_and_resized_frames(real) -> None:
    frames, expressions = real
    converted = resample_expressions(expressions, 25.0)  # positions 0, 1.2, 2.4, ...
    boxes, points, found = face_tracks_for_frames(converted, 7, 256, 256)  # frames shown at half size
    # Back at the driving frames' times (30 fps) and scaled to the smaller frames: exact where a 25 fps frame
    # falls on a 30 fps one (0 and 0.2 s), within a pixel between (interpolated twice).
    torch.testing.assert_close(points[[0, 6]], expressions.points[[0, 6]] / 2)
    assert (points - expressions.points / 2).abs().max() < 1.0
    # A frame counts as found only when everything it was interpolated from was (frame 3 had no face).
    assert found.tolist() == [True, True, False, False, False, True, True]
    with pytest.raises(ValueError, match="cover 7 driving frames, driving_frames has 9"):
        face_tracks_for_frames(expressions, 9, 512, 512)


def test_expression_curves_pick_varying_emotions() -> None:
    count = 50
    features = torch.zeros(count, 554)
    time = torch.linspace(0, 1, count)
    features[:, 12 + 7] = torch.sin(6 * time) * 3  # emotion dim 7 varies most
    features[:, 12 + 2] = time  # then dim 2
    features[25:30, 42:] = 1.0  # the mouth opens for 5 frames
    expressions = ExpressionFeatures(features=features, points=torch.zeros(count, 5, 2), boxes=torch.zeros(count, 4),
                                     found=torch.ones(count, dtype=torch.bool), filled_frames=[], fps=25.0)
    curves = expression_curves(expressions)
    assert curves["emotion_dims"][:2].tolist() == [7, 2]
    assert curves["headpose"].shape == (count, 6) and curves["eye"].shape == (count, 6)
    energy = curves["mouth_energy"]
    assert energy[25:30].min() > 20 and energy[:25].max() == 0


def test_plot_is_an_image_of_the_requested_size(real) -> None:
    _, expressions = real
    image = plot_expression_curves(expressions, width=800, height=600)
    assert image.shape == (600, 800, 3) and image.dtype == np.uint8
    assert image.std() > 10  # lines and text, not a blank canvas
    # The interpolated frame (3 of 0..6) is shaded: a band across the panels, around the middle of the time axis.
    unfilled = dataclasses.replace(expressions, filled_frames=[], found=torch.ones(7, dtype=torch.bool))
    plain = plot_expression_curves(unfilled, width=800, height=600)
    changed = np.abs(image.astype(int) - plain.astype(int)).sum(axis=-1) > 30
    columns = np.flatnonzero(changed[100:550].sum(axis=0) > 100)  # columns changed down most of the panels
    assert len(columns) > 10
    assert 300 < columns.mean() < 500
    with pytest.raises(ValueError, match="at least 320x240"):
        plot_expression_curves(expressions, width=100, height=100)
