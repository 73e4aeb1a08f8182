"""FlashPortrait Evaluate in-process: the user's insightface pack found in models/insightface, the written file
read from the output folder (and nothing outside ComfyUI's folders), clear errors, interruption."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from pack import import_pack

pack = import_pack()
import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402

from real_performances import DRIVING, driving, driving_frames, portrait_image  # noqa: E402
from small_encoder import SmallEncoder  # noqa: E402

evaluate = pack.nodes.evaluate
Evaluate = evaluate.FlashPortraitEvaluate
WINDOWS = pack.nodes.windows.WindowSettings(2, 1)


@pytest.fixture(scope="module")
def expression_model():
    return pack.nodes.loaders.ExpressionModel(encoder=SmallEncoder().eval(), face_backend="mediapipe")


@pytest.fixture()
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.fixture()
def output_dir(tmp_path: Path):
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "output").mkdir()
    try:
        yield tmp_path / "output"
    finally:
        folder_paths.set_output_directory(previous)


def _run(expression_model, **inputs):
    settings = dict(reference_image=portrait_image(), driving_expressions=driving(), expression_model=expression_model,
                    windows=WINDOWS, driving_offset=0, plot_width=640, plot_height=480)
    settings.update(inputs)
    return Evaluate.execute(**settings).result


def test_identity_with_the_users_pack(models_dir: Path, expression_model) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tiny_recognition import write_recognition_model

    write_recognition_model(models_dir / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
    assert evaluate.recognition_choices() == ["auto", "buffalo_l/w600k_r50.onnx"]
    plot, report = _run(expression_model, output_frames=driving_frames(), recognition_model="buffalo_l/w600k_r50.onnx")
    assert plot.shape == (1, 480, 640, 3) and plot.dtype == torch.float32 and 0 <= float(plot.min())
    lines = report.splitlines()
    assert lines[0] == "8 output frames at 25 fps, output frame 0 = driving frame 0"
    assert lines[2].startswith("identity (buffalo_l/w600k_r50.onnx): cosine to the reference median ")
    # 8 frames are 2 latent frames: one window of 2 covers them.
    assert lines[4] == "seams: 1 window(s): no boundary inside the video"


def test_without_a_pack_identity_is_skipped_naming_the_file(models_dir: Path, expression_model) -> None:
    assert evaluate.recognition_choices() == ["auto"]
    other_extractor = dataclasses.replace(driving(),
                                          face_backend="insightface (buffalo_l/det_10g.onnx), chosen by auto")
    _, report = _run(expression_model, output_frames=driving_frames(), driving_expressions=other_extractor)
    identity = report.splitlines()[2]
    assert identity.startswith("identity: skipped: no face-recognition model found: add w600k_r50.onnx (from "
                               "insightface's buffalo_l pack) to ")
    assert str(models_dir / "insightface" / "models" / "buffalo_l") in identity and "glintr100.onnx" in identity
    assert "expression fidelity on 8 frames" in report.splitlines()[3]
    assert report.splitlines()[-1] == ("the driving expressions were extracted with insightface faces, this evaluation "
                                       "finds them with mediapipe: use the same expression model for an exact "
                                       "comparison")


def test_the_written_file_is_read_from_the_output_folder(output_dir: Path, models_dir: Path,
                                                         expression_model) -> None:
    shutil.copy(DRIVING / "lp_d0.mp4", output_dir / "FlashPortrait_00001_.mp4")
    plot, report = _run(expression_model, video_path="FlashPortrait_00001_.mp4", driving_offset=1)
    assert report.startswith("FlashPortrait_00001_.mp4: 78 output frames at 25 fps, output frame 0 = driving frame 1")
    # 78 output frames against 8 driving frames from frame 1: the 7 that exist are compared, and the report says so.
    assert "expression fidelity on 7 frames" in report
    assert report.splitlines()[-1] == ("the output has 78 frames but the driving performance only 7 from frame 1: "
                                       "expressions compared on the first 7")
    absolute = str(output_dir / "FlashPortrait_00001_.mp4")
    assert Evaluate.execute(reference_image=portrait_image(), driving_expressions=driving(),
                            expression_model=expression_model, video_path=absolute,
                            plot_width=320, plot_height=240).result[1].startswith("FlashPortrait_00001_.mp4: 78")


def test_bad_inputs_name_the_input_and_the_fix(tmp_path: Path, output_dir: Path, expression_model) -> None:
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(DRIVING / "lp_d0.mp4", outside)
    with pytest.raises(ValueError, match="video_path '.*elsewhere.mp4' is outside ComfyUI's output, input and temp "
                                         "folders; connect the path output of FlashPortrait Decode to Video File"):
        _run(expression_model, video_path=str(outside))
    with pytest.raises(ValueError, match="video_path '../elsewhere.mp4' is outside"):
        _run(expression_model, video_path="../elsewhere.mp4")
    with pytest.raises(ValueError, match="video_path 'gone.mp4' does not exist"):
        _run(expression_model, video_path="gone.mp4")
    with pytest.raises(ValueError, match="give the output either as output_frames or as video_path .*neither is"):
        _run(expression_model)
    with pytest.raises(ValueError, match="both are connected"):
        _run(expression_model, output_frames=driving_frames(), video_path="x.mp4")
    with pytest.raises(ValueError, match="reference_image must be an IMAGE batch"):
        _run(expression_model, output_frames=driving_frames(), reference_image=torch.zeros(4, 4))


def test_evaluate_stops_when_interrupted(expression_model) -> None:
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(expression_model, output_frames=driving_frames())
    finally:
        comfy.model_management.interrupt_current_processing(False)
