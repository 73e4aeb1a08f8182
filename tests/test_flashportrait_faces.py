"""The flashportrait face backend run by onnxruntime on files in the published face files' layout
(tests/tiny_flashportrait_faces.py), checked against a plain statement of the published pipeline
(tests/published_face_oracle.py): detector boxes, landmark crops and their way back to frame pixels, the five
alignment points, the iterations, the per-region smoothing and the two tracking passes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
cv2 = pytest.importorskip("cv2")

from flashportrait_core.expression.face_track import POINT_NAMES  # noqa: E402
from flashportrait_core.expression.flashportrait_backend import (  # noqa: E402
    FIVE_POINTS, FlashPortraitFaceBackend, FlashPortraitFaceFilesNotFoundError, find_face_files)
from flashportrait_core.expression.flashportrait_detector import FaceFileError  # noqa: E402
from flashportrait_core.expression.landmark_smoothing import LandmarkSmoother  # noqa: E402
from published_face_oracle import Oracle  # noqa: E402
from tiny_flashportrait_faces import (  # noqa: E402
    distance_logits, face_template, grid, write_face_detector, write_landmark_model)

RED_BGR = (40, 60, 250)


def _detector_biases(seed: int, base: float) -> dict[int, np.ndarray]:
    # Distinct per-cell biases: no two candidates score the same, so the suppression's order is defined.
    rng = np.random.default_rng(seed)
    return {stride: base + rng.uniform(-0.5, 0.5, size=grid(stride)) for stride in (8, 16, 32)}


def _detector_logits(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = {}
    for stride in (8, 16, 32):
        rows, columns = grid(stride)
        sides = rng.uniform(1.0, 4.0, size=(rows * columns, 4))
        logits[stride] = np.stack([distance_logits(tuple(row), sharpness=1.5) for row in sides])
    return logits


def _red_detector(path: Path, seed: int = 0, strides: tuple[int, ...] = (8, 16, 32)) -> Path:
    """Fires where the frame is red (it reads the R channel, which is the third of BGR), on `strides`."""
    biases = _detector_biases(seed, -1.0)
    for stride in set(biases) - set(strides):
        biases[stride] -= 20.0
    return write_face_detector(path, channel_weights=(0.0, 0.0, 2.0), biases=biases, logits=_detector_logits(seed))


def _files(folder: Path, detector: Path | None = None, **landmark_settings) -> tuple[Path, Path]:
    detector = detector or _red_detector(folder / "face_det.onnx")
    landmarks = write_landmark_model(folder / "face_landmark.onnx", **landmark_settings)
    return detector, landmarks


def _blob_frame(height: int, width: int, centre: tuple[float, float], radius: float,
                colour: tuple[int, int, int] = RED_BGR) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    cv2.circle(frame, (int(round(centre[0])), int(round(centre[1]))), int(radius), colour, thickness=-1,
               lineType=cv2.LINE_AA)
    return frame


def _backend(detector: Path, landmarks: Path) -> FlashPortraitFaceBackend:
    return FlashPortraitFaceBackend(find_face_files([detector.parent]))


@pytest.mark.parametrize("height, width", [(512, 512), (908, 480), (720, 1280)])
def test_detector_boxes_are_the_published_ones(tmp_path: Path, height: int, width: int) -> None:
    detector, landmarks = _files(tmp_path, template=face_template())
    rng = np.random.default_rng(height)
    frame = (rng.uniform(0, 40, size=(height, width, 3))).astype(np.uint8)
    for _ in range(3):  # red patches: several candidates each, some overlapping
        x, y = rng.integers(0, width - 200), rng.integers(0, height - 200)
        frame[y:y + int(rng.integers(60, 200)), x:x + int(rng.integers(60, 200))] = RED_BGR
    oracle_boxes, oracle_scores = Oracle(detector, landmarks).detect(frame)
    with _backend(detector, landmarks) as backend:
        boxes, scores = backend.detector.faces(frame)
        assert len(backend.detector.faces(np.ascontiguousarray(frame[..., ::-1]))[0]) < len(boxes)  # reads BGR
    assert len(boxes) >= 3
    np.testing.assert_array_equal(boxes, oracle_boxes)
    np.testing.assert_allclose(scores, oracle_scores, rtol=1e-6)


def test_a_planted_box_lands_where_the_resize_puts_it(tmp_path: Path) -> None:
    # One cell of stride 8 at row 17, column 10 (input (80, 136), its centre) scoring high, 3 bins (24 input
    # pixels) on each side. A 512 x 512 frame is scaled by 160 / 512 and centred: input y 56..216.
    rows, columns = grid(8)
    bias = np.full((rows, columns), -10.0)
    bias[17, 10] = 3.0
    detector = write_face_detector(tmp_path / "face_det.onnx", biases={8: bias},
                                   logits={8: distance_logits((3, 3, 3, 3), sharpness=50.0)})
    landmarks = write_landmark_model(tmp_path / "face_landmark.onnx", template=face_template())
    with _backend(detector, landmarks) as backend:
        boxes, scores = backend.detector.faces(np.zeros((512, 512, 3), np.uint8))
        # A portrait frame 480 x 908 is scaled by 272 / 908 and centred: input x 8.1..151.9.
        tall, _ = backend.detector.faces(np.zeros((908, 480, 3), np.uint8))
    np.testing.assert_array_equal(boxes, [[179, 179, 332, 332]])  # (56 .. 104) / 0.3125, truncated
    np.testing.assert_allclose(scores, [1 / (1 + np.exp(-3.0))], rtol=1e-6)
    scale = 272 / 908
    x_offset = 80 - scale * 240
    expected = [int((56 - x_offset) / scale), int(112 / scale), int((104 - x_offset) / scale), int(160 / scale)]
    np.testing.assert_array_equal(tall, [expected])


@pytest.mark.parametrize("angle", [0.0, 12.0])
def test_landmarks_come_back_through_the_published_crops(tmp_path: Path, angle: float) -> None:
    detector, landmarks = _files(tmp_path, template=face_template(angle, seed=3) - 0.1, follow=0.2,
                                 euler=(0.2, -0.3, 0.0))
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)
    box = np.array([200, 90, 350, 260], np.int32)
    oracle = Oracle(detector, landmarks)
    expected, euler, score, matrices = oracle.align(frame, box=box)
    with _backend(detector, landmarks) as backend:
        result = backend.landmark_model.align(frame, box=box)
        from_previous = backend.landmark_model.align(frame, previous=expected)
    np.testing.assert_allclose(result.landmarks, expected, atol=1e-3)
    np.testing.assert_allclose(result.crop, matrices[-1], atol=1e-9)
    assert (result.pitch, result.yaw) == pytest.approx(euler[:2], abs=1e-6)
    assert result.roll == pytest.approx(euler[2], abs=1e-6) and result.score == pytest.approx(score)
    following, _, _, following_matrices = oracle.align(frame, previous=expected)
    np.testing.assert_allclose(from_previous.landmarks, following, atol=1e-3)
    np.testing.assert_allclose(from_previous.crop, following_matrices[-1], atol=1e-9)
    if angle:
        # Each later crop turns by the eye angle measured in the crop before it; this model always answers eyes
        # at -12 degrees in its crop (the template turned counter-clockwise), so the crops turn 0, -12, -12.
        turns = [np.degrees(np.arctan2(m[0, 1], m[0, 0])) for m in matrices]
        np.testing.assert_allclose(turns, [0.0, -12.0, -12.0], atol=1e-4)
        np.testing.assert_allclose(np.degrees(result.roll), -12.0, atol=1e-4)


def test_iterations_converge_on_the_face(tmp_path: Path) -> None:
    # The landmark model follows the crop's brightness centroid; the first crop (from a box beside the face)
    # cuts the face, each later crop is centred better.
    template = face_template() - 0.5  # centred on the centroid
    detector, landmarks = _files(tmp_path, template=template, follow=1.0, score_gain=1.0, score_bias=0.0)
    centre = np.array([300.0, 260.0])
    frame = _blob_frame(512, 512, tuple(centre), 80, colour=(255, 255, 255))  # wider than any crop
    box = np.array([190, 170, 310, 290])
    oracle = Oracle(detector, landmarks)
    errors = []
    with _backend(detector, landmarks) as backend:
        for iterations in (1, 2, 3, 12):
            result = backend.landmark_model.align(frame, box=box, iterations=iterations)
            expected = oracle.align(frame, box=box, iterations=iterations)[0]
            np.testing.assert_allclose(result.landmarks, expected, atol=1e-3)
            found_centre = (result.landmarks - template * 128 / result.crop[0, 0]).mean(axis=0)
            errors.append(float(np.linalg.norm(found_centre - centre)))
    # Each crop about halves the error here (this face is wider than the crops); the published 3 iterations leave
    # a third of it. The limit is a pixel off: the crop centre is pixel 64 of 0..127, so a face wider than the
    # crop is cut one pixel more on the left and top.
    assert errors[0] > 20 and errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[2] < errors[0] / 2 and errors[3] < 1.5


def test_the_five_points_are_landmarks_182_202_36_149_133(tmp_path: Path) -> None:
    detector, landmarks = _files(tmp_path, template=face_template())
    frame = _blob_frame(512, 512, (256, 256), 90)
    with _backend(detector, landmarks) as backend:
        track = backend.detect(np.stack([frame, frame])[..., ::-1].copy())  # RGB in
    assert track.found.all() and track.landmarks.shape == (2, 222, 2)
    np.testing.assert_array_equal(track.points, track.landmarks[:, [182, 202, 36, 149, 133]])
    assert FIVE_POINTS == (182, 202, 36, 149, 133) and POINT_NAMES[0] == "left_pupil"
    left_pupil, right_pupil, nose, left_mouth, right_mouth = track.points[0]
    assert left_pupil[0] < nose[0] < right_pupil[0] and left_mouth[0] < right_mouth[0]
    assert max(left_pupil[1], right_pupil[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def _still_then_moving(seed: int, frames: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    current = rng.uniform(100, 300, size=(222, 2))
    sequence, sizes = [], []
    for index in range(frames):
        # Steps from sub-threshold jitter to large jumps (all three settings of every region).
        step = [0.02, 0.3, 1.0, 3.0, 8.0][index % 5]
        current = current + rng.normal(0, step, size=current.shape) + rng.normal(0, step, size=2)
        sequence.append(current.copy())
        sizes.append(float(rng.uniform(150, 250)))
    return sequence, sizes


def test_smoothing_is_the_published_filter() -> None:
    sequence, sizes = _still_then_moving(0, 40)
    ours, published = LandmarkSmoother(), Oracle.Smoother()
    for landmarks, size in zip(sequence, sizes):
        np.testing.assert_allclose(ours(landmarks, size), published.smooth(landmarks, size), rtol=0, atol=1e-9)
    # A face that jitters by a fraction of a pixel is held almost still.
    rng = np.random.default_rng(2)
    still_face = rng.uniform(100, 300, size=(222, 2))
    jitter = [still_face + rng.normal(0, 0.2, size=still_face.shape) for _ in range(20)]
    again = LandmarkSmoother()
    smoothed = np.array([again(landmarks, 200.0) for landmarks in jitter])
    raw_motion = np.abs(np.diff(np.array(jitter), axis=0)).mean()
    assert np.abs(np.diff(smoothed[1:], axis=0)).mean() < 0.2 * raw_motion


def test_smoothing_a_face_that_did_not_move_keeps_it_where_the_published_code_gives_nan() -> None:
    sequence, _ = _still_then_moving(1, 6)
    frames = sequence[:1] + sequence  # frame 1 repeats frame 0, which passed unsmoothed: no motion at all
    ours, published, published_held = LandmarkSmoother(), Oracle.Smoother(), Oracle.Smoother(nan_on_still=False)
    for index, landmarks in enumerate(frames):
        mine = ours(landmarks, 200.0)
        reference = published.smooth(landmarks, 200.0)
        held = published_held.smooth(landmarks, 200.0)
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, held, atol=1e-9)
        if index >= 1:
            assert np.isnan(reference).all()  # the published arithmetic: 0 / 0 in every region, then for good


def _moving_blob_video(count: int, missing: tuple[int, ...] = ()) -> np.ndarray:
    frames = []
    for index in range(count):
        centre = (230 + 9 * index + 4 * np.sin(index), 250 - 5 * index + 3 * np.cos(2 * index))
        radius = 70 + 3 * index
        frame = _blob_frame(512, 512, centre, radius)
        if index in missing:
            frame[:] = 0
        frames.append(frame)
    return np.stack(frames)


def test_tracking_is_the_published_two_passes(tmp_path: Path) -> None:
    template = face_template(seed=5) - 0.5
    detector = _red_detector(tmp_path / "face_det.onnx", strides=(16, 32))  # 2 to 5 faces a frame, overlapping
    _, landmarks = _files(tmp_path, detector=detector, template=template, follow=1.0, score_gain=1.0,
                          score_bias=0.0, euler=(0.15, 0.3, 0.0))
    frames_bgr = _moving_blob_video(10, missing=(6,))
    kept, expected, _ = Oracle(detector, landmarks).det_landmarks(list(frames_bgr))
    rgb = np.ascontiguousarray(frames_bgr[..., ::-1])
    with _backend(detector, landmarks) as backend:
        track = backend.detect(rgb)
        in_chunks = [backend.detect(rgb[:5]), backend.detect(rgb[5:9], reset=False), backend.detect(rgb[9:], reset=False)]
    assert np.flatnonzero(track.found).tolist() == kept == [i for i in range(10) if i != 6]
    # Within 0.01 pixel: OpenCV keeps a rotation centre in single precision, the backend in double.
    np.testing.assert_allclose(track.landmarks[track.found], expected, atol=1e-2)
    assert np.isnan(track.landmarks[6]).all() and np.isnan(track.points[6]).all()
    chunked = np.concatenate([part.landmarks for part in in_chunks])
    np.testing.assert_array_equal(chunked, track.landmarks)
    # The published boxes are the smoothed landmarks' box.
    np.testing.assert_allclose(track.boxes[0], [*expected[0].min(axis=0), *expected[0].max(axis=0)], atol=1e-2)


def test_small_faces_and_lost_faces_are_not_found(tmp_path: Path) -> None:
    # One planted box of 32 input pixels: 102.4 pixels in a 512 frame, 204.8 in a 1024 frame. The landmarks span
    # the box's height and 0.7 / 0.85 of it across: 84 pixels in the 512 frame, 169 in the 1024 frame.
    rows, columns = grid(8)
    bias = np.full((rows, columns), -10.0)
    bias[17, 10] = 3.0
    detector = write_face_detector(tmp_path / "face_det.onnx", biases={8: bias},
                                   logits={8: distance_logits((2, 2, 2, 2), sharpness=50.0)})
    _, landmarks = _files(tmp_path, detector=detector, template=face_template() - 0.5, follow=1.0, score_gain=1.0,
                          score_bias=0.0)
    small = _blob_frame(512, 512, (256, 256), 30)
    big = _blob_frame(1024, 1024, (512, 512), 60)
    with _backend(detector, landmarks) as backend:
        # A face whose landmarks span under 96 pixels is dropped, as published.
        assert backend.detector.faces(small)[0].tolist() == [[204, 204, 307, 307]]
        assert not backend.detect(small[None]).found.any()
        track = backend.detect(big[None])
        assert track.found.all()
        width, height = track.boxes[0, 2:] - track.boxes[0, :2]
        assert width == pytest.approx(205 * 0.7 / 0.85, abs=1) and height == pytest.approx(205, abs=1)
        # A face the landmark model scores below 1e-4 (here: a black crop) is lost.
        assert not backend.detect(np.zeros((2, 1024, 1024, 3), np.uint8)).found.any()


def test_face_files_are_found_and_missing_ones_named(tmp_path: Path) -> None:
    root = tmp_path / "flashportrait"
    with pytest.raises(FlashPortraitFaceFilesNotFoundError, match=r"put face_det.onnx and face_landmark.onnx"):
        find_face_files([root])
    (root / "FlashPortrait").mkdir(parents=True)
    write_landmark_model(root / "FlashPortrait" / "face_landmark.onnx", template=face_template())
    with pytest.raises(FlashPortraitFaceFilesNotFoundError, match="face_det.onnx is missing beside the other"):
        find_face_files([root])
    _red_detector(root / "FlashPortrait" / "face_det.onnx")
    files = find_face_files([tmp_path / "elsewhere", root])
    assert files.label == "FlashPortrait/face_det.onnx + face_landmark.onnx"
    assert files.detector == root / "FlashPortrait" / "face_det.onnx"
    with FlashPortraitFaceBackend(files) as backend:
        assert backend.description == "flashportrait (FlashPortrait/face_det.onnx + face_landmark.onnx)"


def test_files_of_another_layout_are_refused(tmp_path: Path) -> None:
    from tiny_insightface import PlantedFace, write_scrfd

    write_scrfd(tmp_path / "face_det.onnx", [PlantedFace(row=1, column=1, score=0.9, box_distances=(1, 1, 1, 1))])
    write_landmark_model(tmp_path / "face_landmark.onnx", template=face_template())
    with pytest.raises(FaceFileError, match=r"the published face detector (takes|has)"):
        FlashPortraitFaceBackend(find_face_files([tmp_path]))
    _red_detector(tmp_path / "face_det.onnx")
    write_scrfd(tmp_path / "face_landmark.onnx", [])
    with pytest.raises(FaceFileError, match="has 9 outputs; the published landmark model has 3"):
        FlashPortraitFaceBackend(find_face_files([tmp_path]))
