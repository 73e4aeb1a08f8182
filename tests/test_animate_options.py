"""The main job's options: workflow settings and ComfyUI's device and memory flags, as scripts/animate.py reads them."""
from __future__ import annotations

import pytest

from scripts import animate, comfy_client
from scripts.workflow_prep import TINY_MODELS, Settings, load_ui_workflow, prepare_prompt


def _parse(*argv: str):
    return animate.argument_parser().parse_args(list(argv))


def test_workflow_options_override_only_what_is_given():
    args = _parse("--steps", "8", "--acceleration", "fast", "--window", "21", "--overlap", "5")
    settings = animate.with_options(Settings(), args)
    assert (settings.steps, settings.acceleration, settings.window_length, settings.window_overlap) == (
        8, "fast", 21, 5)
    assert settings.max_side == Settings().max_side and settings.seed == Settings().seed
    assert animate.with_options(Settings(), _parse()) == Settings()
    with pytest.raises(ValueError, match=r"--overlap \(30\) must be smaller than the window \(21 latent frames\)"):
        animate.with_options(Settings(), _parse("--window", "21"))
    with pytest.raises(SystemExit):
        _parse("--acceleration", "turbo")


def test_device_and_memory_flags_reach_the_server_command():
    args = _parse("--lowvram", "--reserve-vram", "3", "--use-pytorch-cross-attention")
    assert animate.host.comfyui_arguments(args) == (
        "auto", ["--lowvram", "--use-pytorch-cross-attention", "--reserve-vram", "3"])
    assert animate.host.comfyui_arguments(_parse("--cpu")) == ("cpu", [])


@pytest.mark.graph
def test_options_set_the_shipped_workflow_widgets(comfy_object_info):
    settings = animate.with_options(Settings(), _parse("--steps", "12", "--acceleration", "balanced",
                                                       "--window", "33", "--overlap", "9"))
    prompt = comfy_client.ui_to_api(load_ui_workflow(), comfy_object_info)
    prepare_prompt(prompt, TINY_MODELS, "reference.png", "driving.mp4", settings)
    sampler = next(node for node in prompt.values() if node["class_type"] == "FlashPortraitSampler")
    windows = next(node for node in prompt.values() if node["class_type"] == "FlashPortraitWindows")
    assert (sampler["inputs"]["steps"], sampler["inputs"]["acceleration"]) == (12, "balanced")
    assert (windows["inputs"]["window_length"], windows["inputs"]["overlap"]) == (33, 9)
