"""The long-form workflow (video file in, video file out) through a real ComfyUI server, tiny models."""
from __future__ import annotations

import shutil
from pathlib import Path

import av
import pytest

from scripts import comfy_client
from scripts.workflow_prep import LONG_WORKFLOW, TINY_MODELS, Settings, load_ui_workflow, prepare_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE = DATA / "reference" / "lp_s0.jpg"
DRIVING = DATA / "driving" / "lp_d18.mp4"  # 480x480, 30 fps

pytestmark = pytest.mark.graph


def test_long_workflow_streams_file_to_file(comfy_server, comfy_object_info):
    shutil.copy(REFERENCE, comfy_server.input_dir / REFERENCE.name)
    shutil.copy(DRIVING, comfy_server.input_dir / DRIVING.name)
    prompt = comfy_client.ui_to_api(load_ui_workflow(LONG_WORKFLOW), comfy_object_info)
    settings = Settings(seed=5, steps=2, max_side=48, window_length=4, window_overlap=1, max_frames=40,
                        filename_prefix="video/graph_long")
    prepare_prompt(prompt, TINY_MODELS, REFERENCE.name, DRIVING.name, settings)
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900, is_alive=comfy_server.is_running)

    texts = {prompt[i]["_meta"]["title"]: "".join(o["text"]) for i, o in entry["outputs"].items() if "text" in o}
    # The video's own rate is kept (as published): 40 frames at 30 fps, trimmed to 37 = 4*9 + 1.
    assert texts["Extraction report"] == \
        "lp_d18.mp4: 40 frames, face found in 40, 0 filled by interpolation; 30 fps; smoothing 0.5; faces: mediapipe"
    assert texts["FlashPortrait Emotion Conditioning"] == (
        "37 driving frames -> 10 latent frames; 40 driving frames trimmed to 37 (4k + 1, as the Wan VAE packs 4 "
        "frames per latent frame plus the first)")
    assert texts["Sampler report"].startswith("3 window(s) x 2 steps")  # 10 latent frames, windows of 4, overlap 1
    videos = [f for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    assert len(videos) == 1
    path = comfy_server.output_dir / videos[0]["subfolder"] / videos[0]["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(30.0)  # the extractor's fps output sets the rate
        assert float(container.duration / av.time_base) == pytest.approx(36 / 30, abs=0.05)
    assert len(frames) == 36  # the reference frame is left out
    height, width = frames[0].shape[:2]
    assert height % 16 == 0 and width % 16 == 0 and max(height, width) == 48
