"""The shipped basic workflow through a real ComfyUI server, with tiny models and real media."""
from __future__ import annotations

import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS, Settings, load_ui_workflow, prepare_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"  # 78 frames at 25 fps

pytestmark = pytest.mark.graph


def _read_video(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return frames, float(stream.average_rate)


@pytest.fixture(scope="module")
def basic_run(comfy_server, comfy_object_info):
    shutil.copy(REFERENCE, comfy_server.input_dir / REFERENCE.name)
    shutil.copy(DRIVING, comfy_server.input_dir / DRIVING.name)
    prompt = comfy_client.ui_to_api(load_ui_workflow(), comfy_object_info)
    # 34 driving frames -> trimmed to 33 = 4*8 + 1 -> 9 latent frames -> windows (0,4) (2,6) (4,8) (5,9).
    settings = Settings(seed=3, steps=3, max_side=64, window_length=4, window_overlap=2, max_frames=34,
                        acceleration="off", filename_prefix="video/graph_basic")
    prepare_prompt(prompt, TINY_MODELS, REFERENCE.name, DRIVING.name, settings)
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900, is_alive=comfy_server.is_running)
    return prompt, entry


def test_basic_workflow_writes_the_expected_video(comfy_server, basic_run):
    _, entry = basic_run
    videos = [f for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    assert len(videos) == 1
    path = comfy_server.output_dir / videos[0]["subfolder"] / videos[0]["filename"]
    frames, fps = _read_video(path)
    reference = Image.open(REFERENCE)
    # Longest side scaled to 64, each side rounded up to a multiple of 16.
    scale = 64 / max(reference.size)
    expected_w = -(-int(reference.size[0] * scale) // 16) * 16
    expected_h = -(-int(reference.size[1] * scale) // 16) * 16
    assert frames.shape == (32, expected_h, expected_w, 3)  # 33 frames minus the reference frame
    assert fps == pytest.approx(25.0)
    assert np.isfinite(frames).all() and frames.std() > 0


def test_reports_show_windows_and_extraction(basic_run):
    prompt, entry = basic_run
    texts = {}
    for node_id, output in entry["outputs"].items():
        if "text" in output:
            texts[prompt[node_id]["_meta"]["title"]] = "".join(output["text"])
    sampler_report = texts["Sampler report"]
    assert sampler_report.startswith("4 window(s) x 3 steps (euler), 24 DiT passes (posi+no_emo per window step)")
    assert "window 3: latent frames 5-8, 6 DiT passes" in sampler_report
    assert texts["Extraction report"].startswith("34 frames, face found in 34")


def test_encoders_are_replaced_by_precomputed_conditioning(basic_run):
    prompt, _ = basic_run
    types = {node["class_type"] for node in prompt.values()}
    assert "FlashPortraitLoadConditioning" in types
    assert not types & {"CLIPLoader", "CLIPTextEncode", "CLIPVisionLoader", "CLIPVisionEncode"}


def test_every_pack_input_has_a_tooltip(comfy_object_info):
    pack_nodes = {name: info for name, info in comfy_object_info.items() if name.startswith("FlashPortrait")}
    assert {"FlashPortraitModelLoader", "FlashPortraitExtractExpressions", "FlashPortraitEmotionConditioning",
            "FlashPortraitWindows", "FlashPortraitSampler", "FlashPortraitDecodeToVideo"} <= set(pack_nodes)
    for name, info in pack_nodes.items():
        assert info["category"] == "FlashPortrait"
        for section in ("required", "optional"):
            for input_name, spec in (info["input"].get(section) or {}).items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
