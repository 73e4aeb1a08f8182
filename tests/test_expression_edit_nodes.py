"""The edit and file nodes in-process: the reference portrait's features extracted by the node, the errors they
give, Save / Load through ComfyUI's model folders, and emotion conditioning from a loaded performance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pack import import_pack

pack = import_pack()
import folder_paths  # noqa: E402

from flashportrait_core.conditioning.portrait_encoder import (load_portrait_encoder,  # noqa: E402
                                                              random_portrait_encoder_state_dict)
from flashportrait_core.expression.edit import scale_components  # noqa: E402
from real_performances import driving, portrait_image, reference_features, talking  # noqa: E402

edit_nodes = pack.nodes.expression_edit
file_nodes = pack.nodes.expression_files
STRENGTHS = {"head_pose": 1.0, "eyes": 1.0, "emotion": 1.0, "mouth": 1.0}


@pytest.fixture(scope="module")
def expression_model():
    # The pack's own encoder class (as the loader builds it), with the weights real_performances uses.
    expression = pack.flashportrait_core.expression
    model = expression.load_fan_encoder(expression.random_fan_encoder_state_dict(seed=0))
    return pack.nodes.loaders.ExpressionModel(encoder=model, face_backend="mediapipe")


@pytest.fixture()
def expressions_folder(tmp_path: Path):
    folder = tmp_path / "flashportrait_expressions"
    pack.nodes.register_model_folders()
    folder_paths.add_model_folder_path("flashportrait_expressions", str(folder), is_default=True)
    try:
        yield folder
    finally:
        folder_paths.folder_names_and_paths["flashportrait_expressions"][0].remove(str(folder))


def test_edit_node_extracts_the_reference_portrait_with_the_same_model(expression_model) -> None:
    edited, report = edit_nodes.FlashPortraitEditExpressions.execute(
        expressions=driving(), neutral="driving first frame", **{**STRENGTHS, "mouth": 1.5}, relative_motion=True,
        pose_lock=True, reference_image=portrait_image(), expression_model=expression_model).result
    reference = reference_features()
    expected = scale_components(driving(), {**STRENGTHS, "mouth": 1.5}, reference=reference, relative=True)
    assert torch.equal(edited.features[:, 6:], expected.features[:, 6:])
    assert torch.equal(edited.features[:, :6], reference[:6].expand(8, -1))  # pose lock: the reference's pose
    assert report == ("8 frames at 25 fps from lp_d0.mp4; edits: relative motion onto the reference portrait (head "
                      "pose x1, eyes x1, emotion x1, mouth x1.5); head pose locked to the reference portrait")


def test_edit_node_names_what_is_missing(expression_model) -> None:
    node = edit_nodes.FlashPortraitEditExpressions
    with pytest.raises(ValueError, match="pose_lock needs the reference portrait's features: connect reference_image "
                                         "and expression_model"):
        node.execute(expressions=driving(), neutral="driving mean", **STRENGTHS, relative_motion=False,
                     pose_lock=True)
    with pytest.raises(ValueError, match="neutral 'reference portrait' needs .*: connect expression_model "):
        node.execute(expressions=driving(), neutral="reference portrait", **{**STRENGTHS, "mouth": 0.5},
                     relative_motion=False, pose_lock=False, reference_image=portrait_image())
    blank = torch.full((1, 64, 64, 3), 0.5)
    with pytest.raises(ValueError, match="no face found in reference_image by mediapipe; use a portrait with the face "
                                         "clearly visible"):
        node.execute(expressions=driving(), neutral="reference portrait", **{**STRENGTHS, "mouth": 0.5},
                     relative_motion=False, pose_lock=False, reference_image=blank, expression_model=expression_model)
    # Nothing to change (every strength 1): the same performance, no reference needed.
    same, report = node.execute(expressions=driving(), neutral="reference portrait", **STRENGTHS,
                                relative_motion=False, pose_lock=False).result
    assert same is driving() and report.endswith("edits: none")


def test_combine_and_retime_nodes() -> None:
    combined, report = edit_nodes.FlashPortraitCombineExpressions.execute(
        expressions=driving(), second=talking(), head_pose="first", eyes="first", emotion="second", mouth="second",
        lengths="hold", second_offset=0).result
    assert combined.features.shape[0] == 8
    assert report.splitlines()[-1] == "lengths: first 8, second 5 frames -> 8 (the shorter one held at its last frame)"
    node = edit_nodes.FlashPortraitRetimeExpressions
    assert node.validate_inputs(loop="ping-pong", loop_frames=0) == \
        "loop 'ping-pong' needs loop_frames: set the length of the looped performance in frames"
    assert node.validate_inputs(loop="off", loop_frames=0) is True
    retimed, frame_count, report = node.execute(expressions=combined, start_frame=1, frame_count=4, speed=2.0,
                                                loop="ping-pong", loop_frames=20).result
    assert frame_count == 20 and torch.equal(retimed.features[:3], combined.features[[1, 3, 1]])
    assert report.endswith("trimmed to frames 1..4 of 8; speed x2: 4 -> 2 frames; ping-pong loop: 2 -> 20 frames")


def test_save_and_load_nodes(expressions_folder: Path) -> None:
    save = file_nodes.FlashPortraitSaveExpressions
    load = file_nodes.FlashPortraitLoadExpressions
    first = save.execute(expressions=driving(), name="take").result[0]
    second = save.execute(expressions=talking(), name="take.safetensors").result[0]
    assert (first, second) == ("take.safetensors", "take_00001.safetensors")  # never overwritten
    assert sorted(folder_paths.get_filename_list("flashportrait_expressions"))[:2] == [first, second]
    expressions, fps, frame_count, report = load.execute(expressions_file=second).result
    assert (fps, frame_count) == (30.0, 6) and torch.equal(expressions.features, talking().features)
    assert report == "take_00001.safetensors: 6 frames at 30 fps from lp_d10.mp4; edits: none"
    assert load.fingerprint_inputs(expressions_file=first) != load.fingerprint_inputs(expressions_file=second)
    for bad in ("", "../up", "a/b", ".hidden", "x" * 101):
        with pytest.raises(ValueError, match="must be a plain file name"):
            save.execute(expressions=driving(), name=bad)
    save_file({"weight": torch.zeros(2)}, str(expressions_folder / "lora.safetensors"))
    with pytest.raises(ValueError, match="lora.safetensors is not a FlashPortrait expressions file"):
        load.execute(expressions_file="lora.safetensors")
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' was not found in the 'flashportrait_expressions' "
                                                "model folder"):
        load.execute(expressions_file="gone.safetensors")


def test_a_loaded_performance_conditions_like_the_extracted_one(expressions_folder: Path) -> None:
    name = file_nodes.FlashPortraitSaveExpressions.execute(expressions=driving(), name="cond").result[0]
    loaded = file_nodes.FlashPortraitLoadExpressions.execute(expressions_file=name).result[0]
    portrait_encoder = load_portrait_encoder(random_portrait_encoder_state_dict(seed=2)).float()
    node = pack.nodes.conditioning.FlashPortraitEmotionConditioning
    from_file = node.execute(expressions=loaded, portrait_encoder=portrait_encoder, ip_scale=1.0, emo_cfg=4.0,
                             text_cfg=1.0).result[0]
    extracted = node.execute(expressions=driving(), portrait_encoder=portrait_encoder, ip_scale=1.0, emo_cfg=4.0,
                             text_cfg=1.0).result[0]
    assert torch.equal(from_file.window_tokens(0, 2), extracted.window_tokens(0, 2))


@pytest.mark.parametrize("node", ["FlashPortraitEditExpressions", "FlashPortraitCombineExpressions",
                                  "FlashPortraitRetimeExpressions", "FlashPortraitSaveExpressions",
                                  "FlashPortraitLoadExpressions", "FlashPortraitEvaluate"])
def test_every_input_has_a_tooltip(node: str) -> None:
    pack.nodes.register_model_folders()  # as ComfyUI's entry point does before the schemas are read
    classes = {cls.__name__: cls for module in (edit_nodes, file_nodes, pack.nodes.evaluate)
               for cls in vars(module).values() if isinstance(cls, type)}
    info = classes[node].GET_NODE_INFO_V1()
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    untold = [name for name, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
    assert untold == [] and info["description"] and info["category"] == "FlashPortrait"
