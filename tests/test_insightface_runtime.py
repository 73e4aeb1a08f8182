"""The insightface backend run by onnxruntime on insightface-format files (tests/tiny_insightface.py).

No published pack can be fetched here; these files have the packs' interfaces and simple, known answers, so the
whole path (letterbox, session, SCRFD decoding, suppression, following, the landmark crop, its input
normalisation and the way back to frame pixels) runs as it does on a real pack and is checked in frame pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from flashportrait_core.expression import extract_expression_features, random_fan_encoder_state_dict  # noqa: E402
from flashportrait_core.expression.backends import resolve_face_backend  # noqa: E402
from flashportrait_core.expression.insightface_backend import (  # noqa: E402
    LANDMARK_POINTS, InsightFaceBackend, input_normalisation, landmark_crop_transform)
from flashportrait_core.expression.pdfgc import load_fan_encoder  # noqa: E402
from tiny_insightface import PlantedFace, write_landmark_model, write_scrfd  # noqa: E402

PORTRAIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "fp_case1.png"
FACE = PlantedFace(row=30, column=40, score=0.9, box_distances=(8, 10, 9, 12))


def _portrait() -> np.ndarray:
    return np.asarray(Image.open(PORTRAIT).convert("RGB"))


def _pack(tmp_path: Path, faces: list[PlantedFace], landmark_bias: np.ndarray | None = None,
          landmark_weight: np.ndarray | None = None, normalises_input: bool = True) -> Path:
    folder = tmp_path / "models" / "buffalo_l"
    detector = write_scrfd(folder / "det_10g.onnx", faces)
    if landmark_bias is not None:
        weight = np.zeros((3, 212)) if landmark_weight is None else landmark_weight
        write_landmark_model(folder / "2d106det.onnx", weight, landmark_bias, normalises_input)
    return detector


def test_detector_answer_comes_back_in_frame_pixels(tmp_path: Path) -> None:
    frame = _portrait()
    detector = _pack(tmp_path, [FACE])
    scale = 640 / max(frame.shape[:2])  # the frame is letterboxed into the 640 input
    with InsightFaceBackend(detector) as backend:
        boxes, scores, points = backend.faces(frame)
        track = backend.detect(np.stack([frame, frame]))
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_allclose(boxes[0], FACE.box_in_input() / scale, rtol=1e-3)
    np.testing.assert_allclose(points[0], FACE.points_in_input() / scale, rtol=1e-3)
    assert track.found.tolist() == [True, True] and track.landmarks is None  # this pack has no landmark model
    np.testing.assert_allclose(track.points[1], FACE.points_in_input() / scale, rtol=1e-3)


def test_the_followed_face_is_kept_when_a_larger_one_is_reported(tmp_path: Path) -> None:
    frame = _portrait()
    larger_elsewhere = PlantedFace(row=10, column=10, score=0.95, box_distances=(15, 15, 15, 15))
    first = _pack(tmp_path / "one", [FACE])
    both = _pack(tmp_path / "two", [FACE, larger_elsewhere])
    with InsightFaceBackend(first) as one_face, InsightFaceBackend(both) as two_faces:
        started = one_face.detect(frame[None])
        two_faces._follower = one_face._follower  # the same video, now with a second, larger face
        continued = two_faces.detect(frame[None], reset=False)
    np.testing.assert_allclose(continued.boxes[0], started.boxes[0], rtol=1e-5)
    with InsightFaceBackend(both) as fresh:
        np.testing.assert_allclose(fresh.detect(frame[None]).boxes[0],
                                   larger_elsewhere.box_in_input() * max(frame.shape[:2]) / 640, rtol=1e-3)


def test_landmarks_land_where_the_model_puts_them_in_its_crop(tmp_path: Path) -> None:
    # Constant answers in the model's [-1, 1] crop coordinates: the centre, the crop's corners, a point between.
    crop_points = np.zeros((LANDMARK_POINTS, 2))
    crop_points[1], crop_points[2], crop_points[3] = (-1, -1), (1, 1), (0.5, -0.25)
    detector = _pack(tmp_path, [FACE], landmark_bias=crop_points.reshape(-1))
    frame = _portrait()
    with InsightFaceBackend(detector) as backend:
        assert backend.description == "insightface (buffalo_l/det_10g.onnx + 2d106det.onnx)"
        track = backend.detect(np.stack([frame, frame]))
    assert track.landmarks.shape == (2, LANDMARK_POINTS, 2)
    box = track.boxes[0].astype(np.float64)
    centre, side = (box[:2] + box[2:]) / 2, max(box[2] - box[0], box[3] - box[1]) * 1.5
    expected = centre + crop_points[:4] * side / 2
    np.testing.assert_allclose(track.landmarks[0, :4], expected, atol=1e-3)
    np.testing.assert_allclose(track.landmarks[1], track.landmarks[0])
    assert resolve_face_backend("auto", [tmp_path]).description == \
        "insightface (buffalo_l/det_10g.onnx + 2d106det.onnx), chosen by auto"
    with InsightFaceBackend(detector, landmarks=False) as detector_only:
        assert detector_only.description == "insightface (buffalo_l/det_10g.onnx)"
        assert detector_only.detect(frame[None]).landmarks is None


def test_landmark_input_is_normalised_once_whichever_side_does_it(tmp_path: Path) -> None:
    # The model reads the crop's mean red: the answer moves with the colour, and it is the same whether the graph
    # normalises its input (raw pixels go in) or expects normalised pixels.
    weight = np.zeros((3, 212))
    weight[0] = 1.0
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 200, 10, 60  # uniform colour, larger than the crop
    results = {}
    for normalises in (True, False):
        root = tmp_path / str(normalises)
        detector = _pack(root, [FACE], landmark_bias=np.zeros(212), landmark_weight=weight,
                         normalises_input=normalises)
        assert input_normalisation(detector.parent / "2d106det.onnx") == ((0.0, 1.0) if normalises else (127.5, 128.0))
        with InsightFaceBackend(detector) as backend:
            results[normalises] = backend.detect(frame[None]).landmarks[0]
    np.testing.assert_allclose(results[True], results[False], atol=1e-3)
    with InsightFaceBackend(_pack(tmp_path / "box", [FACE])) as backend:
        box = backend.detect(frame[None]).boxes[0].astype(np.float64)
    red = (200 - 127.5) / 128  # the crop's mean red after normalisation, the same for every point
    centre, half_side = (box[:2] + box[2:]) / 2, max(box[2] - box[0], box[3] - box[1]) * 1.5 / 2
    np.testing.assert_allclose(results[True][0], centre + red * half_side, atol=1e-3)


def test_crop_transform_maps_the_box_centre_to_the_middle() -> None:
    transform = landmark_crop_transform(np.array([100.0, 50.0, 300.0, 150.0]), 192)
    centre = transform @ np.array([200.0, 100.0, 1.0])
    np.testing.assert_allclose(centre, [96, 96])
    np.testing.assert_allclose(transform[0, 0], 192 / 300)


def test_extraction_runs_on_the_insightface_backend(tmp_path: Path) -> None:
    crop_points = np.linspace(-0.5, 0.5, 212)
    detector = _pack(tmp_path, [FACE], landmark_bias=crop_points)
    frames = np.repeat(_portrait()[None].astype(np.float32) / 255, 3, axis=0)
    import torch

    encoder = load_fan_encoder(random_fan_encoder_state_dict(0))
    with InsightFaceBackend(detector) as backend:
        result = extract_expression_features(torch.from_numpy(frames), encoder, backend, batch_size=2)
    assert result.features.shape == (3, 554) and bool(torch.isfinite(result.features).all())
    assert result.found.all() and result.landmarks.shape == (3, LANDMARK_POINTS, 2)


def test_without_onnx_the_detector_runs_and_the_report_says_why_there_are_no_landmarks(
        tmp_path: Path, hide_module) -> None:
    detector = _pack(tmp_path, [FACE], landmark_bias=np.zeros(212))
    hide_module("onnx")
    note = "insightface (buffalo_l/det_10g.onnx; 2d106det.onnx not read: pip install onnx)"
    assert resolve_face_backend("insightface", [tmp_path]).description == note
    with InsightFaceBackend(detector) as backend:
        track = backend.detect(_portrait()[None])
        assert backend.description == note
    assert track.found.all() and track.landmarks is None
