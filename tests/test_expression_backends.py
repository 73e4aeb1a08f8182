"""Face backend choice: insightface pack and FlashPortrait face file discovery and their errors, `auto`, and the
SCRFD output decoding.

Discovery, errors and the post-processing arithmetic are tested here; tests/test_insightface_runtime.py runs
the backend through onnxruntime on insightface-format files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flashportrait_core.expression import backends
from flashportrait_core.expression.backends import FaceBackendUnavailableError, resolve_face_backend
from flashportrait_core.expression.face_track import REACQUIRE_AFTER_FRAMES, FaceFollower
from flashportrait_core.expression.insightface_backend import (
    InsightFaceBackend,
    InsightFacePackNotFoundError,
    InsightFaceUnavailableError,
    anchor_centres,
    decode_scrfd,
    find_detector,
    import_onnxruntime,
    letterbox,
    non_maximum_suppression,
)


def _pack(root: Path, pack: str, detector: str, under_models: bool = True) -> Path:
    folder = (root / "models" / pack) if under_models else (root / pack)
    folder.mkdir(parents=True)
    (folder / "w600k_r50.onnx").write_bytes(b"recognition model, not a detector")
    path = folder / detector
    path.write_bytes(b"stand-in file: discovery only reads names")
    return path


@pytest.fixture()
def without_onnxruntime(hide_module) -> None:
    hide_module("onnxruntime")


@pytest.fixture()
def with_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend onnxruntime is importable, for the choice logic only (no session is ever created)."""
    monkeypatch.setattr(backends, "import_onnxruntime", lambda: None)


def test_finds_the_detector_of_a_pack(tmp_path: Path) -> None:
    buffalo = _pack(tmp_path, "buffalo_l", "det_10g.onnx")
    assert find_detector([tmp_path]) == buffalo
    antelope = _pack(tmp_path, "antelopev2", "scrfd_10g_bnkps.onnx")
    assert find_detector([tmp_path]) == antelope  # the preferred pack first
    assert find_detector([tmp_path], pack="buffalo_l") == buffalo
    other_root = tmp_path / "elsewhere"
    custom = _pack(other_root, "my_pack", "det_500m.onnx", under_models=False)
    assert find_detector([tmp_path / "empty", other_root]) == custom


def test_missing_pack_says_where_to_put_which_file(tmp_path: Path) -> None:
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    (tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx").write_bytes(b"")  # no detector in it
    with pytest.raises(InsightFacePackNotFoundError) as raised:
        find_detector([tmp_path])
    message = str(raised.value)
    assert f"put the pack's files in {tmp_path / 'models' / 'buffalo_l'}/" in message
    assert "det_10g.onnx" in message and "scrfd_10g_bnkps.onnx" in message
    with pytest.raises(InsightFacePackNotFoundError, match="'antelopev2' not found"):
        find_detector([tmp_path], pack="antelopev2")
    assert issubclass(InsightFacePackNotFoundError, FileNotFoundError)


def test_missing_onnxruntime_says_how_to_install(tmp_path: Path, without_onnxruntime) -> None:
    with pytest.raises(InsightFaceUnavailableError, match="pip install onnxruntime"):
        import_onnxruntime()
    detector = _pack(tmp_path, "buffalo_l", "det_10g.onnx")
    with pytest.raises(ImportError, match=r"onnxruntime-gpu for CUDA\), or choose the mediapipe backend"):
        InsightFaceBackend(detector)


def test_explicit_choices(tmp_path: Path, with_onnxruntime) -> None:
    assert resolve_face_backend("mediapipe").name == "mediapipe"
    with pytest.raises(InsightFacePackNotFoundError, match="put the pack's files"):
        resolve_face_backend("insightface", [tmp_path])
    detector = _pack(tmp_path, "buffalo_l", "det_10g.onnx")
    choice = resolve_face_backend("insightface", [tmp_path])
    assert (choice.name, choice.detector_path, choice.description) == (
        "insightface", str(detector), "insightface (buffalo_l/det_10g.onnx)")
    with pytest.raises(ValueError, match="auto, flashportrait, mediapipe, insightface"):
        resolve_face_backend("dlib", [tmp_path])


def test_auto_prefers_a_pack_and_says_why_it_fell_back(tmp_path: Path, with_onnxruntime) -> None:
    fallback = resolve_face_backend("auto", [tmp_path])
    assert fallback.name == "mediapipe"
    assert fallback.description == "mediapipe, chosen by auto (insightface model pack not found)"
    _pack(tmp_path, "buffalo_l", "det_10g.onnx")
    chosen = resolve_face_backend("auto", [tmp_path])
    assert chosen.name == "insightface"
    assert chosen.description == "insightface (buffalo_l/det_10g.onnx), chosen by auto"


def test_auto_without_onnxruntime_uses_mediapipe(tmp_path: Path, without_onnxruntime) -> None:
    _pack(tmp_path, "buffalo_l", "det_10g.onnx")
    choice = resolve_face_backend("auto", [tmp_path])
    assert choice.name == "mediapipe"
    assert "insightface face backend runs its detector with onnxruntime" in choice.description


def test_no_backend_at_all_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            without_onnxruntime) -> None:
    def no_mediapipe():
        raise backends.MediaPipeUnavailableError("pip install mediapipe==0.10.21")

    monkeypatch.setattr(backends, "import_mediapipe", no_mediapipe)
    with pytest.raises(FaceBackendUnavailableError, match="pip install mediapipe.*pip install onnxruntime"):
        resolve_face_backend("auto", [tmp_path])


def test_scrfd_decoding_of_one_anchor_and_suppression() -> None:
    size = 64  # strides 8, 16, 32 -> 8x8, 4x4, 2x2 cells, two anchors each
    counts = [(size // stride) ** 2 * 2 for stride in (8, 16, 32)]
    scores = [np.zeros((count, 1), np.float32) for count in counts]
    distances = [np.zeros((count, 4), np.float32) for count in counts]
    offsets = [np.zeros((count, 10), np.float32) for count in counts]
    # Stride 8, cell (row 2, column 3), second anchor: centre (24, 16).
    index = (2 * 8 + 3) * 2 + 1
    scores[0][index] = 0.9
    distances[0][index] = [1.0, 0.5, 2.0, 3.0]  # in strides: left, top, right, bottom
    offsets[0][index] = [-1, -1, 1, -1, 0, 0, -1, 1, 1, 1]
    scores[0][index - 1] = 0.4  # below the threshold
    boxes, kept_scores, points = decode_scrfd(scores + distances + offsets, size, size)
    np.testing.assert_allclose(boxes, [[16.0, 12.0, 40.0, 40.0]])
    np.testing.assert_allclose(kept_scores, [0.9])
    np.testing.assert_allclose(points[0], [[16, 8], [32, 8], [24, 16], [16, 24], [32, 24]])
    np.testing.assert_allclose(anchor_centres(2, 2, 32), [[0, 0], [0, 0], [32, 0], [32, 0], [0, 32], [0, 32],
                                                          [32, 32], [32, 32]])
    with pytest.raises(ValueError, match="has 9 outputs, this one has 6"):
        decode_scrfd(scores + distances, size, size)
    candidates = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    keep = non_maximum_suppression(candidates, np.array([0.8, 0.9, 0.7], np.float32))
    assert keep.tolist() == [1, 2]  # the two overlapping boxes keep the better one


def test_letterbox_keeps_the_aspect_at_the_top_left() -> None:
    frame = np.full((480, 960, 3), 200, np.uint8)
    square, scale = letterbox(frame, 640)
    assert square.shape == (640, 640, 3) and scale == pytest.approx(320 / 480)
    assert square[:320].min() == 200 and square[320:].max() == 0


def test_follower_keeps_one_face_and_reacquires() -> None:
    follower = FaceFollower()
    small, big = np.array([0.0, 0, 100, 100]), np.array([300.0, 0, 500, 200])
    assert follower.choose([small]) == 0
    assert follower.choose([big, small + 3]) == 1  # the followed face, though the other is bigger
    for _ in range(REACQUIRE_AFTER_FRAMES - 1):
        assert follower.choose([big]) is None
    assert follower.choose([big]) is None  # away long enough: forgotten
    assert follower.choose([big]) == 0


def _face_files(folder: Path, which: tuple[str, ...] = ("face_det.onnx", "face_landmark.onnx")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in which:
        (folder / name).write_bytes(b"stand-in file: discovery only reads names")
    return folder


def test_auto_prefers_the_flashportrait_face_files(tmp_path: Path, with_onnxruntime) -> None:
    insightface = tmp_path / "insightface"
    _pack(insightface, "buffalo_l", "det_10g.onnx")
    weights = _face_files(tmp_path / "flashportrait")
    chosen = resolve_face_backend("auto", [insightface], flashportrait_folders=[weights])
    assert (chosen.name, chosen.description) == (
        "flashportrait", "flashportrait (face_det.onnx + face_landmark.onnx), chosen by auto")
    assert chosen.face_files.detector == weights / "face_det.onnx"
    assert chosen.face_files.landmarks == weights / "face_landmark.onnx"
    explicit = resolve_face_backend("flashportrait", flashportrait_folders=[weights])
    assert explicit.description == "flashportrait (face_det.onnx + face_landmark.onnx)"
    # Without the flashportrait folders (e.g. a caller that has none) auto keeps its other choices.
    assert resolve_face_backend("auto", [insightface]).name == "insightface"


def test_auto_falls_back_when_a_face_file_is_missing(tmp_path: Path, with_onnxruntime) -> None:
    weights = _face_files(tmp_path / "flashportrait", ("face_det.onnx",))
    insightface = tmp_path / "insightface"
    fallback = resolve_face_backend("auto", [insightface], flashportrait_folders=[weights])
    assert fallback.name == "mediapipe"
    assert fallback.description == ("mediapipe, chosen by auto (FlashPortrait face files incomplete; insightface "
                                    "model pack not found)")
    _pack(insightface, "buffalo_l", "det_10g.onnx")
    assert resolve_face_backend("auto", [insightface], flashportrait_folders=[weights]).name == "insightface"
    with pytest.raises(FileNotFoundError, match="face_landmark.onnx is missing beside the other in"):
        resolve_face_backend("flashportrait", flashportrait_folders=[weights])
    with pytest.raises(FileNotFoundError, match="put face_det.onnx and face_landmark.onnx from the FlashPortrait "
                                                "download in"):
        resolve_face_backend("flashportrait", flashportrait_folders=[tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="no flashportrait model folder to search"):
        resolve_face_backend("flashportrait")


def test_flashportrait_without_onnxruntime(tmp_path: Path, without_onnxruntime) -> None:
    weights = _face_files(tmp_path / "flashportrait")
    with pytest.raises(ImportError, match=r"with onnxruntime: pip install onnxruntime \(or onnxruntime-gpu"):
        resolve_face_backend("flashportrait", flashportrait_folders=[weights])
    choice = resolve_face_backend("auto", flashportrait_folders=[weights])
    assert choice.name == "mediapipe" and "the flashportrait face backend runs face_det.onnx" in choice.description


def test_flashportrait_without_opencv(tmp_path: Path, hide_module) -> None:
    weights = _face_files(tmp_path / "flashportrait")
    hide_module("cv2")
    with pytest.raises(ImportError, match="needs OpenCV for its crops: pip install opencv-python-headless"):
        resolve_face_backend("flashportrait", flashportrait_folders=[weights])
