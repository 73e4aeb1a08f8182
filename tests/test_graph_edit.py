"""The edit workflow through a real ComfyUI server on the tiny models: extract -> edit -> save -> conditioning ->
sampler -> decode -> evaluate; then the saved performance, loaded instead of extracted, gives the same video."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from flashportrait_core.expression.performance_file import load_performance
from scripts import comfy_client
from scripts.workflow_prep import REPO_ROOT, TINY_MODELS, Settings, load_ui_workflow, prepare_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"  # 25 fps
EDIT_WORKFLOW = REPO_ROOT / "workflows" / "flashportrait_edit.json"

pytestmark = pytest.mark.graph


def _texts(prompt: dict, entry: dict) -> dict[str, str]:
    return {prompt[i]["_meta"]["title"]: "".join(o["text"]) for i, o in entry["outputs"].items() if "text" in o}


def _video(server, entry: dict) -> np.ndarray:
    [video] = [f for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    with av.open(str(server.output_dir / video["subfolder"] / video["filename"])) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _node_id(prompt: dict, class_type: str) -> str:
    [node_id] = [i for i, node in prompt.items() if node["class_type"] == class_type]
    return node_id


def test_edit_workflow_edits_saves_and_evaluates(comfy_server, comfy_object_info, tiny_models_dir):
    shutil.copy(REFERENCE, comfy_server.input_dir / REFERENCE.name)
    shutil.copy(DRIVING, comfy_server.input_dir / DRIVING.name)
    prompt = comfy_client.ui_to_api(load_ui_workflow(EDIT_WORKFLOW), comfy_object_info)
    settings = Settings(seed=3, steps=1, max_side=32, window_length=2, window_overlap=1, max_frames=13,
                        acceleration="off", filename_prefix="video/graph_edit")
    prepare_prompt(prompt, TINY_MODELS, REFERENCE.name, DRIVING.name, settings)
    saved_before = set((tiny_models_dir / "flashportrait_expressions").glob("*.safetensors"))
    entry = comfy_client.run_prompt(comfy_server.url, prompt, timeout=900, is_alive=comfy_server.is_running)
    saved = sorted(set((tiny_models_dir / "flashportrait_expressions").glob("*.safetensors")) - saved_before)
    try:
        texts = _texts(prompt, entry)
        assert texts["Edit report"] == ("13 frames at 25 fps from lp_d0.mp4; faces: mediapipe; edits: relative motion "
                                        "onto the reference portrait (head pose x1, eyes x1, emotion x1, mouth x1)")
        # Saved into the pack's model folder (the models folder of this server), with the edit recorded.
        assert len(saved) == 1
        performance = load_performance(saved[0])
        assert performance.features.shape == (13, 554) and performance.edits == [
            "relative motion onto the reference portrait (head pose x1, eyes x1, emotion x1, mouth x1)"]
        report = texts["Evaluation report"].splitlines()
        # 13 driving frames -> 4 latent frames -> 12 frames written (the reference frame left out).
        assert report[0] == "graph_edit_00001_.mp4: 12 output frames at 25 fps, output frame 0 = driving frame 1"
        assert report[2].startswith("identity: skipped: no face-recognition model found: add w600k_r50.onnx")
        # The tiny random models draw noise, not a face: the monitor says so instead of scoring it.
        assert report[1] == "faces: found in 0 of 12 output frames; none in frames 0-11 (0.00-0.48 s)"
        assert report[3] == "expression fidelity: skipped: no face found in any of the 12 output frames"
        # Windows of 2 latent frames with overlap 1 over 4: they start or end at latent frames 1, 2 and 3, i.e.
        # between written frames 3|4 and 7|8 (latent frame 1 begins with the reference frame, left out).
        assert report[4].startswith("seams: 2 window boundary(ies) at frame pairs [3, 7]; change there ")
        plots = [f for f in comfy_client.output_files(entry, ("images",)) if f["filename"].endswith(".png")]
        assert len(plots) == 1, comfy_client.output_files(entry, ("images",))
        first_video = _video(comfy_server, entry)
        assert first_video.shape[0] == 12

        # Another run from the saved file: no extraction, no edit, the same conditioning and so the same video.
        loaded = copy.deepcopy(prompt)
        for class_type in ("FlashPortraitEvaluate", "FlashPortraitSaveExpressions", "FlashPortraitEditExpressions",
                           "FlashPortraitExtractExpressionsFromVideo", "FlashPortraitExpressionModelLoader"):
            del loaded[_node_id(loaded, class_type)]
        loaded = {i: node for i, node in loaded.items() if node["class_type"] not in ("PreviewAny", "PreviewImage")
                  or node["_meta"]["title"] == "Sampler report"}
        loaded["900"] = {"class_type": "FlashPortraitLoadExpressions", "inputs": {"expressions_file": saved[0].name},
                         "_meta": {"title": "Saved performance"}}
        loaded[_node_id(loaded, "FlashPortraitEmotionConditioning")]["inputs"]["expressions"] = ["900", 0]
        decode = loaded[_node_id(loaded, "FlashPortraitDecodeToVideo")]["inputs"]
        decode.update(fps=["900", 1], filename_prefix="video/graph_edit_loaded")
        again = comfy_client.run_prompt(comfy_server.url, loaded, timeout=900, is_alive=comfy_server.is_running)
        assert np.array_equal(_video(comfy_server, again), first_video)
    finally:
        for path in saved:
            path.unlink()
