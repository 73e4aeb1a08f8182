"""Every shipped workflow is valid for the running server: node types, required inputs, widget values."""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts import comfy_client

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
UI_ONLY = {"Note", "MarkdownNote", "Reroute"}

pytestmark = pytest.mark.graph


def test_workflows_are_shipped():
    assert [p.name for p in WORKFLOWS] == ["flashportrait_basic.json", "flashportrait_compare.json",
                                           "flashportrait_edit.json", "flashportrait_fast.json",
                                           "flashportrait_long.json", "flashportrait_native.json"]


def test_basic_workflow_runs_the_published_settings(comfy_object_info):
    import json

    workflow = json.loads((WORKFLOWS[0].parent / "flashportrait_basic.json").read_text())
    prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    sampler = by_type["FlashPortraitSampler"]
    assert {k: sampler[k] for k in ("steps", "shift", "max_side", "acceleration", "schedule", "sampler")} == {
        "steps": 30, "shift": 5.0, "max_side": 720, "acceleration": "off", "schedule": "published",
        "sampler": "euler"}
    assert {k: by_type["FlashPortraitEmotionConditioning"][k] for k in ("ip_scale", "emo_cfg", "text_cfg")} == {
        "ip_scale": 1.0, "emo_cfg": 4.0, "text_cfg": 1.0}
    assert by_type["FlashPortraitWindows"] == {"window_length": 51, "overlap": 30}


def test_native_workflow_drives_the_guider_with_comfyuis_sampling(comfy_object_info):
    import json

    workflow = json.loads((WORKFLOWS[0].parent / "flashportrait_native.json").read_text())
    prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
    (sampler_id, advanced), = [(i, n) for i, n in prompt.items() if n["class_type"] == "SamplerCustomAdvanced"]
    source = {name: prompt[link[0]] for name, link in advanced["inputs"].items()}
    assert source["guider"]["class_type"] == "FlashPortraitGuider"
    assert source["latent_image"]["class_type"] == "FlashPortraitGuider"  # its empty video latent
    assert source["sampler"]["inputs"] == {"sampler_name": "euler"}
    assert source["sigmas"]["class_type"] == "FlashPortraitSchedule"
    assert source["sigmas"]["inputs"] == {"schedule": "published", "steps": 30, "shift": 5.0, "denoise": 1.0}
    assert source["noise"]["class_type"] == "RandomNoise"
    decode = next(n for n in prompt.values() if n["class_type"] == "VAEDecode")
    assert decode["inputs"]["samples"] == [sampler_id, 0]
    assert "FlashPortraitSampler" not in {n["class_type"] for n in prompt.values()}


@pytest.mark.parametrize("unmute", [False, True], ids=["as-shipped", "muted-nodes-enabled"])
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_server_definitions(path, unmute, comfy_object_info):
    import json

    workflow = json.loads(path.read_text())
    if unmute:  # optional branches ship muted; they must be valid once the user enables them
        for node in workflow["nodes"]:
            node["mode"] = 0
    assert any(node["type"] in UI_ONLY for node in workflow["nodes"]), "every workflow explains itself in a note"
    prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
    for node_id, node in prompt.items():
        info = comfy_object_info[node["class_type"]]
        # Beside the pack's own nodes only ComfyUI's core nodes, so a plain install plus this pack runs it.
        module = info["python_module"]
        assert node["class_type"].startswith("FlashPortrait") or module == "nodes" or \
            module.startswith("comfy_extras."), f"{path.name}: node {node_id} ({node['class_type']}) is from {module}"
        for name, spec in (info["input"].get("required") or {}).items():
            assert name in node["inputs"], f"{path.name}: node {node_id} ({node['class_type']}) lacks {name}"
            value = node["inputs"][name]
            # Combos: a list of options, or ["COMBO", {"options": [...]}] for nodes on the newer schema.
            options = spec[0] if isinstance(spec[0], list) else \
                (spec[1].get("options") if spec[0] == "COMBO" and len(spec) > 1 else None)
            # Model file names depend on the user's folders; every other choice must be one the server offers.
            if options is not None and not str(value).endswith((".safetensors", ".pt", ".pth", ".png", ".mp4")):
                assert value in options, f"{path.name}: node {node_id} {name}={value!r} not in {options}"


def test_fast_and_compare_workflows_use_the_presets(comfy_object_info):
    import json

    def samplers(name: str) -> dict[str, dict]:
        workflow = json.loads((WORKFLOWS[0].parent / name).read_text())
        prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
        return {node["_meta"]["title"]: node["inputs"] for node in prompt.values()
                if node["class_type"] == "FlashPortraitSampler"}

    assert [inputs["acceleration"] for inputs in samplers("flashportrait_fast.json").values()] == ["fast"]  # B muted
    compare = samplers("flashportrait_compare.json")
    assert {title: inputs["acceleration"] for title, inputs in compare.items()} == {
        "Full (ALP off)": "off", "Accelerated (ALP fast)": "fast"}
    full, fast = compare.values()
    # Everything but the preset is shared: same seed, steps, inputs.
    assert {k: v for k, v in full.items() if k != "acceleration"} == \
        {k: v for k, v in fast.items() if k != "acceleration"}


def test_fast_workflow_has_the_four_step_lora_branch(comfy_object_info):
    import json

    workflow = json.loads((WORKFLOWS[0].parent / "flashportrait_fast.json").read_text())
    for node in workflow["nodes"]:
        node["mode"] = 0
    prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
    lora_id, lora = next((i, n) for i, n in prompt.items() if n["class_type"] == "LoraLoaderModelOnly")
    assert lora["inputs"]["lora_name"] == "fast_lora_rank64.safetensors" and lora["inputs"]["strength_model"] == 1.0
    assert prompt[lora["inputs"]["model"][0]]["class_type"] == "FlashPortraitModelLoader"
    lora_samplers = [n for n in prompt.values() if n["class_type"] == "FlashPortraitSampler"
                     and n["inputs"]["model"] == [lora_id, 0]]
    assert [n["inputs"]["acceleration"] for n in lora_samplers] == ["4-step LoRA"]
    # Shipped muted: a user without the LoRA file runs the ALP branch without a missing-file error.
    shipped = comfy_client.ui_to_api(json.loads((WORKFLOWS[0].parent / "flashportrait_fast.json").read_text()),
                                     comfy_object_info)
    assert "LoraLoaderModelOnly" not in {n["class_type"] for n in shipped.values()}


def test_loader_dropdowns_list_the_files_in_the_model_folders(comfy_object_info, tiny_models_dir):
    # The server finds the models through extra_model_paths.yaml (the tiny models folder); the pack's own
    # folders (flashportrait, flashportrait_conditioning) are registered with folder_paths like ComfyUI's.
    def options(node: str, name: str) -> list[str]:
        spec = comfy_object_info[node]["input"]["required"][name]
        return spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # ["COMBO", {"options": ...}]

    weights = sorted(p.name for p in (tiny_models_dir / "flashportrait").iterdir())
    assert sorted(options("FlashPortraitModelLoader", "flashportrait_weights")) == weights
    assert sorted(options("FlashPortraitPortraitEncoderLoader", "portrait_encoder")) == weights
    assert sorted(options("FlashPortraitExpressionModelLoader", "expression_encoder")) == weights
    assert options("FlashPortraitModelLoader", "wan_model") == ["wan2.1_i2v_tiny.safetensors"]
    assert options("FlashPortraitLoadConditioning", "conditioning") == ["tiny_prompt.safetensors"]
    assert "fast_lora_tiny.safetensors" in options("LoraLoaderModelOnly", "lora_name")
