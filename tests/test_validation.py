"""Input checks before heavy work, the sampler's out-of-memory handling, and the loaders' safetensors preference."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from flashportrait_core.validation import (InputError, NonFiniteInputError, ShapeMismatchError,
                                           check_expression_features, check_sampler_inputs,
                                           require_finite, require_image_batch, require_same_device_and_dtype,
                                           require_same_length, size_note, trim_note, window_note)
from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model, tiny_vae  # noqa: F401 (fixtures)

pack = import_pack()
REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reference"
import comfy.model_management  # noqa: E402
from flashportrait_pack.flashportrait_core import validation as pack_validation  # noqa: E402

loaders = pack.nodes.loaders
conditioning_nodes = pack.nodes.conditioning
sampler_node = pack.nodes.sampler
wan_runner = pack.nodes.wan_runner
windows_node = pack.nodes.windows


def _tokens(frames: int = 3) -> torch.Tensor:
    return torch.randn(frames, 97, 64, generator=torch.Generator().manual_seed(0))


def _good_sampler_inputs() -> dict:
    return dict(reference_image=torch.rand(1, 40, 30, 3), emotion_tokens=_tokens(), positive=torch.zeros(1, 5, 32),
                negative=torch.zeros(1, 7, 32), clip_vision_states=torch.zeros(1, 257, 16))


def test_good_inputs_pass():
    check_sampler_inputs(**_good_sampler_inputs())
    check_expression_features(torch.zeros(9, 554), torch.ones(9, dtype=torch.bool), 554)
    require_image_batch("frames", torch.rand(2, 17, 33, 4))  # RGBA and odd sizes are fine


@pytest.mark.parametrize("name, value, error, words", [
    ("reference_image", torch.rand(40, 30, 3), ShapeMismatchError, "IMAGE batch [N, H, W, C]"),
    ("reference_image", torch.rand(0, 40, 30, 3), ShapeMismatchError, "is empty"),
    ("reference_image", torch.rand(1, 40, 30, 2), ShapeMismatchError, "2 channels"),
    ("reference_image", torch.full((1, 8, 8, 3), math.nan), NonFiniteInputError, "192 NaN/Inf value(s) of 192"),
    ("emotion_tokens", torch.randn(3, 97), ShapeMismatchError, "[latent frames, tokens, width]"),
    ("emotion_tokens", torch.randn(0, 97, 64), InputError, "0 latent frames"),
    ("emotion_tokens", _tokens().index_fill(0, torch.tensor([1]), math.inf), NonFiniteInputError, "NaN/Inf"),
    ("positive", torch.full((1, 5, 32), math.nan), NonFiniteInputError, "positive conditioning"),
    ("negative", torch.zeros(1, 5, 16), ShapeMismatchError, "same text encoder"),
    ("clip_vision_states", torch.full((1, 257, 16), -math.inf), NonFiniteInputError, "clip_vision_output"),
])
def test_bad_sampler_inputs_are_named(name, value, error, words):
    inputs = _good_sampler_inputs()
    inputs[name] = value
    with pytest.raises(error) as raised:
        check_sampler_inputs(**inputs)
    assert isinstance(raised.value, ValueError) and words in str(raised.value)
    assert name.split("_")[0] in str(raised.value)  # the message names the input


@pytest.mark.parametrize("features, found, words", [
    (torch.zeros(9, 554), torch.ones(8, dtype=torch.bool), "expressions.features has 9 frame(s) but "
                                                           "expressions.found has 8"),
    (torch.zeros(9, 512), None, "512 values per frame but the portrait encoder takes 554"),
    (torch.zeros(0, 554), None, "0 frames"),
    (torch.zeros(554), None, "[frames, 554]"),
    (torch.zeros(9, 554).index_fill(0, torch.tensor([4]), math.nan), None, "554 NaN/Inf"),
])
def test_bad_expression_features_are_named(features, found, words):
    with pytest.raises(InputError, match="expressions") as raised:
        check_expression_features(features, found, 554)
    assert words in str(raised.value)


def test_small_checks_name_both_inputs():
    with pytest.raises(ShapeMismatchError, match="driving has 10 frame.* but features has 9; re-extract"):
        require_same_length("driving", 10, "features", 9, "re-extract")
    with pytest.raises(ShapeMismatchError, match="b is torch.float16 but a is torch.float32"):
        require_same_device_and_dtype({"a": torch.zeros(1), "b": torch.zeros(1, dtype=torch.float16)}, "cast")
    require_same_device_and_dtype({"a": torch.zeros(1), "b": torch.ones(2)}, "cast")
    require_finite("mask", torch.ones(3, dtype=torch.bool), "unused")  # integer and bool tensors are finite


def test_adjusted_inputs_are_reported():
    assert window_note(9, 51) == ("window_length 51 is longer than the video (9 latent frames): one window of 9 "
                                  "latent frames is used")
    assert window_note(9, 9) is None
    assert size_note(512, 512, 720, 720, 720) is None
    assert size_note(1000, 333, 720, 720, 240) == ("output 240x720: the reference 333x1000 scaled to max_side 720 "
                                                   "is 239x720, each side rounded up to a multiple of 16")
    assert trim_note(34, 33).startswith("34 driving frames trimmed to 33 (4k + 1")
    assert trim_note(33, 33) is None


# --- the nodes, in-process on the tiny checkpoints -------------------------------------------------------------



def test_loader_reads_the_file_chosen_not_its_safetensors_twin(tiny_folders):
    chosen = loaders.model_file("flashportrait", "transformer_tiny.pt")
    assert chosen == str(tiny_folders / "flashportrait" / "transformer_tiny.pt")  # transformer_tiny.safetensors too
    assert loaders.model_file("flashportrait", "pd_fpg_tiny.pth").endswith("pd_fpg_tiny.pth")


def _emotion(num_latent: int) -> EmotionConditioning:
    return EmotionConditioning(latent_tokens=_tokens(num_latent), num_video_frames=4 * (num_latent - 1) + 1,
                               ip_scale=1.0, emo_cfg=1.0, text_cfg=1.0)


def _run_sampler(model, vae, reference, emotion, window_length=4, overlap=2, max_side=32, steps=1):
    positive, negative, clip_output = conditioning_nodes.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    windows = windows_node.WindowSettings(window_length, overlap)
    return sampler_node.FlashPortraitSampler.execute(model, positive, negative, clip_output, vae, reference, emotion,
                                                     windows, seed=1, steps=steps, shift=5.0, max_side=max_side,
                                                     acceleration="off").result


def test_sampler_refuses_a_nan_reference_before_encoding(tiny_model, tiny_vae, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference was encoded")

    monkeypatch.setattr(wan_runner, "reference_condition", must_not_run)
    reference = torch.rand(1, 40, 30, 3)
    reference[0, 3, 4, 1] = math.nan
    with pytest.raises(pack_validation.NonFiniteInputError, match="reference_image holds 1 NaN/Inf"):
        _run_sampler(tiny_model, tiny_vae, reference, _emotion(3))


def test_sampler_clips_a_long_window_and_reports_sizes(tiny_model, tiny_vae):
    latent, report = _run_sampler(tiny_model, tiny_vae, torch.rand(1, 40, 30, 3), _emotion(3), window_length=51,
                                  overlap=30, max_side=36)
    assert latent["samples"].shape == (1, 16, 3, 6, 4)  # 36x27 rounded up to 48x32
    assert report.startswith("1 window(s) x 1 steps")
    assert "window_length 51 is longer than the video (3 latent frames)" in report
    assert "output 32x48: the reference 30x40 scaled to max_side 36 is 27x36" in report
    assert "no face found in reference_image by mediapipe" in report  # random pixels: reported, not refused


def test_sampler_says_nothing_about_a_reference_with_a_face(tiny_model, tiny_vae):
    portrait = torch.from_numpy(np.asarray(Image.open(REFERENCE_DIR / "fp_case1.png").convert("RGB")).copy()) / 255.0
    _, report = _run_sampler(tiny_model, tiny_vae, portrait[None].float(), _emotion(3), max_side=32)
    assert "no face found" not in report


def test_out_of_memory_frees_and_names_the_settings(tiny_model, tiny_vae, monkeypatch):
    emptied = []
    monkeypatch.setattr(comfy.model_management, "soft_empty_cache", lambda *a, **k: emptied.append(True))
    inner = tiny_model.model
    held = []

    def apply_model_out_of_memory(*args, **kwargs):
        held.append(torch.zeros(1))  # something the failed step allocated
        raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(inner, "apply_model", apply_model_out_of_memory)
    with pytest.raises(comfy.model_management.OOM_EXCEPTION) as raised:
        _run_sampler(tiny_model, tiny_vae, torch.rand(1, 40, 30, 3), _emotion(5))
    assert isinstance(raised.value, wan_runner.SamplingOutOfMemory)
    message = str(raised.value)
    assert "Tried to allocate 20.00 GiB" in message and "2 window(s) of 4 latent frames at 32x32" in message
    for setting in ("window_length", "max_side", "fp8_e4m3fn", "--lowvram"):
        assert setting in message
    assert emptied == [True]
    assert raised.value.__cause__ is None and raised.value.__context__ is None  # the failed frames are not kept


def test_emotion_conditioning_node_refuses_mismatched_expressions(tiny_folders):
    encoder = loaders.FlashPortraitPortraitEncoderLoader.execute("portrait_encoder_tiny.safetensors").result[0]
    width = encoder.config.feature_dim

    class Expressions:
        features = torch.zeros(9, width)
        found = torch.ones(7, dtype=torch.bool)

    with pytest.raises(pack_validation.ShapeMismatchError, match="9 frame.* but expressions.found has 7"):
        conditioning_nodes.FlashPortraitEmotionConditioning.execute(Expressions(), encoder, 1.0, 4.0, 1.0)
    Expressions.found = torch.ones(9, dtype=torch.bool)
    emotion, report = conditioning_nodes.FlashPortraitEmotionConditioning.execute(Expressions(), encoder, 1.0, 4.0,
                                                                                  1.0).result
    assert emotion.num_video_frames == 9 and emotion.num_latent_frames == 3
    assert report == "9 driving frames -> 3 latent frames"


def test_window_node_names_the_fix():
    message = windows_node.FlashPortraitWindows.validate_inputs(5, 5)
    assert message == "overlap (5) must be smaller than window_length (5): lower overlap to at most 4 or raise " \
                      "window_length"


def test_sampler_node_offers_euler_then_comfyuis_samplers_and_refuses_what_needs_euler():
    import comfy.samplers

    options = next(i for i in sampler_node.FlashPortraitSampler.define_schema().inputs if i.id == "sampler").options
    # ComfyUI's CFG++ samplers need its two-condition CFG, which FlashPortrait's guidance replaces.
    assert options[0] == "euler" and sorted(options) == sorted(
        name for name in comfy.samplers.KSampler.SAMPLERS if not name.endswith("_cfg_pp"))
    assert "euler_cfg_pp" in comfy.samplers.KSampler.SAMPLERS and "euler_cfg_pp" not in options
    assert "adams2" not in options and "adams3" not in options
    validate = sampler_node.FlashPortraitSampler.validate_inputs
    assert validate(acceleration="off", sampler="ipndm") is True
    # A workflow saved with a sampler the node no longer offers is refused when queued, naming what to choose.
    assert "sampler 'adams2' is not available" in validate(acceleration="off", sampler="adams2")
    assert "not available" in validate(acceleration="off", sampler="euler_cfg_pp")
    assert validate(acceleration="quality", sampler="euler") is True
    message = validate(acceleration="fast", sampler="dpmpp_2m")
    assert "'dpmpp_2m' and acceleration 'fast' do not combine" in message and "set sampler to euler" in message
    message = validate(acceleration="4-step LoRA", sampler="deis")
    assert "trained for Euler steps" in message and "set sampler to euler" in message
    # The sampler the node builds is the one KSamplerSelect gives, named in the report as chosen.
    built = sampler_node.step_sampler("ddim")
    reference = comfy.samplers.sampler_object("ddim")
    assert built.sampler_function is reference.sampler_function and built.inpaint_options == reference.inpaint_options
    assert built.label == "ddim"


def test_no_node_validation_hides_comfyuis_own_range_checks():
    # ComfyUI skips its min/max and list checks for every input when validate_inputs takes **kwargs, and for the
    # inputs it names: a node's validation names only the widgets it checks itself.
    import inspect

    from comfy_api.latest import io

    nodes = [value for value in vars(pack.nodes).values()
             if isinstance(value, type) and issubclass(value, io.ComfyNode) and value is not io.ComfyNode]
    assert len(nodes) >= 20
    checked = {node.__name__: inspect.getfullargspec(node.validate_inputs) for node in nodes
               if "validate_inputs" in vars(node)}
    assert {"FlashPortraitSampler", "FlashPortraitGuiderNode", "FlashPortraitDevices"} <= set(checked)
    assert {name: spec.varkw for name, spec in checked.items() if spec.varkw} == {}
    assert "seed" not in checked["FlashPortraitSampler"].args and "threads" not in checked["FlashPortraitDevices"].args


def test_widgets_a_node_validates_itself_keep_comfyuis_range_and_list_checks():
    windows = windows_node.FlashPortraitWindows.validate_inputs
    assert windows(window_length=300, overlap=4) == "window_length: value 300 bigger than max of 201"
    assert windows(window_length=8, overlap=-1) == "overlap: value -1 smaller than min of 0"
    assert windows(window_length=8, overlap=4) is True
    retime = pack.nodes.expression_edit.FlashPortraitRetimeExpressions.validate_inputs
    assert retime(loop="bounce", loop_frames=10) == "loop: 'bounce' not in ['off', 'ping-pong', 'repeat']"
    guider = pack.nodes.guider_nodes.FlashPortraitGuiderNode.validate_inputs
    assert guider(acceleration="off", target_speedup=-1.0, resume="off") == \
        "target_speedup: value -1.0 smaller than min of 0.0"
    assert "resume: 'sometimes' not in" in guider(acceleration="off", target_speedup=0.0, resume="sometimes")
    sampler = sampler_node.FlashPortraitSampler.validate_inputs
    assert sampler(acceleration="turbo") == "acceleration: 'turbo' not in " + str(
        [i for i in sampler_node.FlashPortraitSampler.define_schema().inputs if i.id == "acceleration"][0].options)
