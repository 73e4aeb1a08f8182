"""The expression nodes in-process: the file node's path handling, fingerprint and outputs; the frames node."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from pack import import_pack

pack = import_pack()
import folder_paths  # noqa: E402

from flashportrait_pack.flashportrait_core.expression import (  # noqa: E402
    load_fan_encoder,
    random_fan_encoder_state_dict,
    read_video_frames,
)

expressions_nodes = pack.nodes.expressions
DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


@pytest.fixture(scope="module")
def expression_model():
    encoder = load_fan_encoder(random_fan_encoder_state_dict(seed=5))
    return pack.nodes.loaders.ExpressionModel(encoder=encoder, face_backend="mediapipe")


@pytest.fixture()
def input_dir(tmp_path: Path):
    previous = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    try:
        yield folder
    finally:
        folder_paths.set_input_directory(previous)


def test_video_list_and_path_resolution(input_dir: Path, tmp_path: Path) -> None:
    shutil.copy(DRIVING / "lp_d0.mp4", input_dir / "talking.mp4")
    (input_dir / "notes.txt").write_text("not a video")
    assert expressions_nodes.input_videos() == ["talking.mp4"]
    node = expressions_nodes.FlashPortraitExtractExpressionsFromVideo
    assert node.validate_inputs(video="talking.mp4", path="") is True
    assert expressions_nodes.resolve_video_path("talking.mp4", "") == str(input_dir / "talking.mp4")
    # A path typed (or pasted with quotes) wins over the list; a relative one is looked up in the input folder.
    elsewhere = tmp_path / "elsewhere.mp4"
    shutil.copy(DRIVING / "lp_d0.mp4", elsewhere)
    assert expressions_nodes.resolve_video_path("talking.mp4", f' "{elsewhere}" ') == str(elsewhere)
    assert expressions_nodes.resolve_video_path(None, "talking.mp4") == str(input_dir / "talking.mp4")
    # Clear messages, returned by validation before anything runs.
    message = node.validate_inputs(video="gone.mp4", path="")
    assert "'gone.mp4' is not in ComfyUI's input folder" in message
    message = node.validate_inputs(video="talking.mp4", path="/no/such/clip.mp4")
    assert "'/no/such/clip.mp4' does not exist" in message
    assert "put a video in ComfyUI's input folder" in node.validate_inputs(video="", path="")


def test_fingerprint_changes_when_the_file_changes(input_dir: Path) -> None:
    video = input_dir / "talking.mp4"
    shutil.copy(DRIVING / "lp_d0.mp4", video)
    node = expressions_nodes.FlashPortraitExtractExpressionsFromVideo
    first = node.fingerprint_inputs(video="talking.mp4", path="", batch_size=16, smoothing=0.5)
    assert node.fingerprint_inputs(video="talking.mp4", path="", batch_size=8) == first  # same file: same print
    # The same name with other content (re-uploaded or edited): a new fingerprint, so the node runs again.
    shutil.copy(DRIVING / "lp_d12.mp4", video)
    second = node.fingerprint_inputs(video="talking.mp4", path="")
    assert second != first
    # Touched with a new modification time but the same size: also re-run.
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert node.fingerprint_inputs(video="talking.mp4", path="") != second


def test_file_node_outputs(input_dir: Path, expression_model) -> None:
    shutil.copy(DRIVING / "lp_d3.mp4", input_dir / "talking.mp4")  # 30 fps
    node = expressions_nodes.FlashPortraitExtractExpressionsFromVideo
    output = node.execute(video="talking.mp4", expression_model=expression_model, batch_size=4, max_frames=4,
                          smoothing=0.5, target_fps=25.0, path="")
    expressions, fps, frame_count, report = output.result
    # 4 frames at 30 fps last 0.1 s: output frames at 0, 0.04 and 0.08 s.
    assert (fps, frame_count) == (25.0, 3)
    assert expressions.features.shape == (3, 554) and torch.isfinite(expressions.features).all()
    assert report == "talking.mp4: 3 frames, face found in 3, 0 filled by interpolation; 25 fps, resampled from " \
                     "4 frames at 30 fps; smoothing 0.5; faces: mediapipe"


def test_frames_node_uses_smoothing_and_fps(expression_model) -> None:
    frames, fps = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=3)
    node = expressions_nodes.FlashPortraitExtractExpressions
    expressions, report = node.execute(driving_frames=frames, expression_model=expression_model, batch_size=2,
                                       max_frames=0, smoothing=0.3, fps=fps).result
    assert expressions.features.shape == (3, 554)
    assert (expressions.fps, expressions.smoothing) == (25.0, 0.3)
    assert report == "3 frames, face found in 3, 0 filled by interpolation; 25 fps; smoothing 0.3; faces: mediapipe"


def test_preview_nodes_return_images(expression_model) -> None:
    frames, fps = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=2)
    expressions, _ = expressions_nodes.FlashPortraitExtractExpressions.execute(
        driving_frames=frames, expression_model=expression_model, batch_size=2, max_frames=0, smoothing=0.0).result
    (overlay,) = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames,
                                                                     expressions=expressions).result
    assert overlay.shape == frames.shape and not torch.equal(overlay, frames)
    # The face mesh's landmarks are drawn by default and left out when the toggle is off.
    assert expressions.landmarks.shape == (2, 478, 2)
    (without,) = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames, expressions=expressions,
                                                                     draw_landmarks=False).result
    changed = (overlay != without).any(dim=-1)
    assert 400 < int(changed[0].sum()) <= 478 and not torch.equal(without, frames)
    (plot,) = expressions_nodes.FlashPortraitPlotExpressions.execute(expressions=expressions, width=640,
                                                                     height=480).result
    assert plot.shape == (1, 480, 640, 3) and plot.dtype == torch.float32
    assert 0.0 <= float(plot.min()) and float(plot.max()) <= 1.0 and float(plot.std()) > 0.02


def test_loader_reports_a_missing_insightface_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backends = pack.flashportrait_core.expression.backends
    monkeypatch.setattr(backends, "import_onnxruntime", lambda: None)  # as if installed: the pack is what's missing
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    loader = pack.nodes.loaders.FlashPortraitExpressionModelLoader
    with pytest.raises(FileNotFoundError) as raised:
        loader.execute(expression_encoder="pd_fpg.pth", face_backend="insightface")
    assert f"put the pack's files in {tmp_path / 'models' / 'insightface' / 'models' / 'buffalo_l'}/" in \
        str(raised.value)
    assert pack.nodes.loaders.insightface_roots() == [str(tmp_path / "models" / "insightface")]


def test_insightface_pack_runs_through_the_nodes(tmp_path: Path, input_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An insightface-format pack (tests/tiny_insightface.py) in models/insightface: the loader picks it for
    `auto`, the report names its files and Preview Faces draws its 106 landmarks."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import numpy as np
    from tiny_insightface import PlantedFace, write_landmark_model, write_scrfd

    folder = tmp_path / "models" / "insightface" / "models" / "buffalo_l"
    write_scrfd(folder / "det_10g.onnx", [PlantedFace(row=30, column=30, score=0.9, box_distances=(8, 9, 8, 10))])
    write_landmark_model(folder / "2d106det.onnx", np.zeros((3, 212)), np.linspace(-0.6, 0.6, 212), True)
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    shutil.copy(DRIVING / "lp_d0.mp4", input_dir / "talking.mp4")
    choice = pack.flashportrait_core.expression.backends.resolve_face_backend(
        "auto", pack.nodes.loaders.insightface_roots())
    model = pack.nodes.loaders.ExpressionModel(encoder=load_fan_encoder(random_fan_encoder_state_dict(seed=5)),
                                               face_backend="auto", backend=choice)
    expressions, fps, frame_count, report = expressions_nodes.FlashPortraitExtractExpressionsFromVideo.execute(
        video="talking.mp4", expression_model=model, batch_size=2, max_frames=3, smoothing=0.0, target_fps=0.0,
        path="").result
    assert report.endswith("faces: insightface (buffalo_l/det_10g.onnx + 2d106det.onnx), chosen by auto")
    assert expressions.landmarks.shape == (3, 106, 2) and bool(torch.isfinite(expressions.landmarks).all())
    frames, _ = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=3)
    with_landmarks, = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames,
                                                                          expressions=expressions).result
    without, = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames, expressions=expressions,
                                                                   draw_landmarks=False).result
    changed = (with_landmarks != without).any(dim=-1)
    assert 50 < int(changed[0].sum()) <= 106 * 9  # the 106 dots (some may coincide or sit under the 5 points)


def test_flashportrait_face_files_run_through_the_nodes(tmp_path: Path, input_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """FlashPortrait's face files (in their published layout, tests/tiny_flashportrait_faces.py) beside pd_fpg.pth
    in models/flashportrait: the loader's `auto` picks them, a whole real driving video is extracted with them,
    the report names the backend and its files, and Preview Faces draws their 222 landmarks."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tiny_flashportrait_faces import write_skin_face_files

    weights = tmp_path / "models" / "flashportrait"
    weights.mkdir(parents=True)
    write_skin_face_files(weights)
    torch.save(random_fan_encoder_state_dict(seed=5), weights / "pd_fpg.pth")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "flashportrait",
                        ([str(weights)], set(folder_paths.supported_pt_extensions)))
    (model,) = pack.nodes.loaders.FlashPortraitExpressionModelLoader.execute(expression_encoder="pd_fpg.pth",
                                                                             face_backend="auto").result
    described = "flashportrait (face_det.onnx + face_landmark.onnx), chosen by auto"
    assert (model.backend.name, model.backend.description) == ("flashportrait", described)
    # The whole video: the faces are what is tested here, so a small stand-in encodes them (the FanEncoder
    # costs seconds a frame on this CPU).
    from small_encoder import SmallEncoder

    shutil.copy(DRIVING / "lp_d0.mp4", input_dir / "talking.mp4")
    expressions, fps, frame_count, report = expressions_nodes.FlashPortraitExtractExpressionsFromVideo.execute(
        video="talking.mp4", expression_model=dataclasses.replace(model, encoder=SmallEncoder()), batch_size=16,
        max_frames=0, smoothing=0.5, target_fps=0.0, path="").result
    assert (fps, frame_count) == (25.0, 78)
    assert report == ("talking.mp4: 78 frames, face found in 78, 0 filled by interpolation; 25 fps; points smoothed "
                      "by the published 222-landmark filter (the smoothing setting is for the other face backends); "
                      f"faces: {described}")
    assert expressions.features.shape == (78, 554) and bool(torch.isfinite(expressions.features).all())
    assert expressions.landmarks.shape == (78, 222, 2) and bool(torch.isfinite(expressions.landmarks).all())
    # No filter of ours on top: the alignment points are the published landmarks 182, 202, 36, 149, 133.
    torch.testing.assert_close(expressions.points, expressions.landmarks[:, [182, 202, 36, 149, 133]])
    # The face is the person's (about the middle of the 512 x 512 frame), held steady.
    centres = (expressions.boxes[:, :2] + expressions.boxes[:, 2:]) / 2
    assert bool(((centres - torch.tensor([256.0, 285.0])).abs() < 40).all())
    assert float((expressions.points[1:] - expressions.points[:-1]).norm(dim=-1).mean()) < 1.0
    frames, _ = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=2)
    with_landmarks, = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames,
                                                                          expressions=expressions).result
    without, = expressions_nodes.FlashPortraitPreviewFaces.execute(driving_frames=frames, expressions=expressions,
                                                                   draw_landmarks=False).result
    changed = (with_landmarks != without).any(dim=-1)
    assert 150 < int(changed[0].sum()) <= 222  # one-pixel dots at 512 pixels (some coincide or sit under points)
