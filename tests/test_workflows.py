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
                                           "flashportrait_fast.json", "flashportrait_long.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_server_definitions(path, comfy_object_info):
    import json

    workflow = json.loads(path.read_text())
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
            options = spec[0] if isinstance(spec[0], list) else None
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

    assert [inputs["acceleration"] for inputs in samplers("flashportrait_fast.json").values()] == ["fast"]
    compare = samplers("flashportrait_compare.json")
    assert {title: inputs["acceleration"] for title, inputs in compare.items()} == {
        "Full (ALP off)": "off", "Accelerated (ALP fast)": "fast"}
    full, fast = compare.values()
    # Everything but the preset is shared: same seed, steps, inputs.
    assert {k: v for k, v in full.items() if k != "acceleration"} == \
        {k: v for k, v in fast.items() if k != "acceleration"}
