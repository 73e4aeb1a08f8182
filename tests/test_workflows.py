"""Every shipped workflow is valid for the running server: node types, required inputs, widget values."""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts import comfy_client

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
UI_ONLY = {"Note", "MarkdownNote", "Reroute"}

pytestmark = pytest.mark.graph


def test_workflows_are_shipped():
    assert [p.name for p in WORKFLOWS] == ["flashportrait_basic.json", "flashportrait_long.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_server_definitions(path, comfy_object_info):
    import json

    workflow = json.loads(path.read_text())
    assert any(node["type"] in UI_ONLY for node in workflow["nodes"]), "every workflow explains itself in a note"
    prompt = comfy_client.ui_to_api(workflow, comfy_object_info)
    for node_id, node in prompt.items():
        info = comfy_object_info[node["class_type"]]
        for name, spec in (info["input"].get("required") or {}).items():
            assert name in node["inputs"], f"{path.name}: node {node_id} ({node['class_type']}) lacks {name}"
            value = node["inputs"][name]
            options = spec[0] if isinstance(spec[0], list) else None
            # Model file names depend on the user's folders; every other choice must be one the server offers.
            if options is not None and not str(value).endswith((".safetensors", ".pt", ".pth", ".png", ".mp4")):
                assert value in options, f"{path.name}: node {node_id} {name}={value!r} not in {options}"
