"""The shipped comparison workflow through a real ComfyUI server: full and accelerated side by side.

Tiny models, real media. Both samplers read the same inputs and seed; the test checks the stitched video's
layout (full left, accelerated right, each at the sampler's size), that the halves differ, the reports' pass
counts and the counts each sampler sends to the UI.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = REPO_ROOT / "workflows" / "flashportrait_compare.json"
DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"
STEPS = 5
MAX_FRAMES = 10  # trimmed to 9 = 4*2 + 1 -> 3 latent frames, one window
MAX_SIDE = 48

pytestmark = pytest.mark.graph


def _read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _prepare(prompt: dict, filename_prefix: str) -> dict:
    """Tiny models, the sample media, small settings; both samplers fed by precomputed conditioning."""
    def nodes(class_type: str) -> list[tuple[str, dict]]:
        return [(node_id, node) for node_id, node in prompt.items() if node["class_type"] == class_type]

    def set_all(class_type: str, **values) -> None:
        found = nodes(class_type)
        assert found, f"the comparison workflow has no {class_type}"
        for _, node in found:
            node["inputs"].update(values)

    set_all("FlashPortraitModelLoader", wan_model=TINY_MODELS.wan, flashportrait_weights=TINY_MODELS.transformer)
    set_all("FlashPortraitPortraitEncoderLoader", portrait_encoder=TINY_MODELS.portrait_encoder)
    set_all("FlashPortraitExpressionModelLoader", expression_encoder=TINY_MODELS.expression_encoder)
    set_all("VAELoader", vae_name=TINY_MODELS.vae)
    set_all("LoadImage", image=REFERENCE.name)
    set_all("LoadVideo", file=DRIVING.name)
    set_all("FlashPortraitExtractExpressions", max_frames=MAX_FRAMES)
    set_all("FlashPortraitSampler", steps=STEPS, max_side=MAX_SIDE)
    set_all("SaveVideo", filename_prefix=filename_prefix)
    # The text and CLIP-vision encoders have no tiny variant: a precomputed conditioning file stands in.
    loader_id = "900"
    prompt[loader_id] = {"class_type": "FlashPortraitLoadConditioning",
                         "inputs": {"conditioning": TINY_MODELS.precomputed_conditioning},
                         "_meta": {"title": "Precomputed prompt and CLIP-vision conditioning"}}
    for _, sampler in nodes("FlashPortraitSampler"):
        for slot, name in enumerate(("positive", "negative", "clip_vision_output")):
            sampler["inputs"][name] = [loader_id, slot]
    encoders = {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}
    for node_id in [node_id for node_id, node in prompt.items() if node["class_type"] in encoders]:
        del prompt[node_id]
    return prompt


def _texts(prompt: dict, entry: dict) -> dict[str, str]:
    return {prompt[node_id]["_meta"]["title"]: "".join(output["text"])
            for node_id, output in entry["outputs"].items() if "text" in output and node_id in prompt
            and prompt[node_id]["class_type"] == "PreviewAny"}


@pytest.fixture(scope="module")
def compare_run(comfy_server, comfy_object_info):
    import json

    shutil.copy(REFERENCE, comfy_server.input_dir / REFERENCE.name)
    shutil.copy(DRIVING, comfy_server.input_dir / DRIVING.name)
    prompt = _prepare(comfy_client.ui_to_api(json.loads(WORKFLOW.read_text()), comfy_object_info),
                      "video/graph_compare")
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900, is_alive=comfy_server.is_running)
    return prompt, entry


def _video_of(comfy_server, entry: dict) -> np.ndarray:
    videos = [f for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    assert len(videos) == 1
    return _read_video(comfy_server.output_dir / videos[0]["subfolder"] / videos[0]["filename"])


def test_side_by_side_video(comfy_server, compare_run):
    _, entry = compare_run
    frames = _video_of(comfy_server, entry)
    # 9 frames minus the reference; each half is one sampler's output at 48 px on the longest side.
    assert frames.shape[0] == 8
    height, width = frames.shape[1:3]
    assert width % 2 == 0 and max(height, width // 2) == MAX_SIDE
    left, right = frames[:, :, : width // 2], frames[:, :, width // 2:]
    assert left.std() > 0 and right.std() > 0
    # ALP skips DiT passes, so the accelerated half differs from the full one (same seed, same inputs).
    assert np.abs(left.astype(np.int16) - right.astype(np.int16)).mean() > 0.5


def test_reports_show_full_and_accelerated_pass_counts(compare_run):
    prompt, entry = compare_run
    texts = _texts(prompt, entry)
    full, fast = texts["Full sampler report"], texts["Accelerated sampler report"]
    full_passes = int(re.match(rf"1 window\(s\) x {STEPS} steps \(euler\), (\d+) DiT passes", full).group(1))
    fast_passes = int(re.match(rf"1 window\(s\) x {STEPS} steps \(euler\), (\d+) DiT passes", fast).group(1))
    assert "skipped" not in full
    computed, skipped = map(int, re.search(r"ALP: (\d+) steps computed, (\d+) skipped", fast).groups())
    assert computed + skipped == STEPS and skipped > 0
    # Each computed step costs the same guidance passes in both samplers.
    assert fast_passes * STEPS == full_passes * computed


def test_samplers_send_their_counts_to_the_ui(compare_run):
    prompt, entry = compare_run
    counts = {prompt[node_id]["_meta"]["title"]: output["flashportrait_report"][0]
              for node_id, output in entry["outputs"].items() if "flashportrait_report" in output}
    full, fast = counts["Full (ALP off)"], counts["Accelerated (ALP fast)"]
    assert (full["windows"], full["latent_frames"], full["steps"]) == (1, 3, STEPS)
    assert (full["steps_computed"], full["steps_skipped"]) == (STEPS, 0)
    assert fast["steps_computed"] + fast["steps_skipped"] == STEPS and fast["steps_skipped"] > 0
    assert fast["dit_passes"] < full["dit_passes"]
    texts = _texts(prompt, entry)
    # The node's own text is the report its output socket carries.
    assert "".join(entry["outputs"][next(i for i, n in prompt.items() if n["_meta"]["title"] == "Full (ALP off)")]
                   ["text"]) == texts["Full sampler report"]
