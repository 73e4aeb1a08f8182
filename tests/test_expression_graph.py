"""The video-file extraction node through a real ComfyUI server: outputs, and caching of its result.

ComfyUI caches every node's outputs keyed by its inputs: the same video and settings do not recompute. The node's
fingerprint (file size and modification time) makes an edited or replaced file run again.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from scripts import comfy_client
from scripts.workflow_prep import TINY_MODELS

DRIVING = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving"

pytestmark = pytest.mark.graph


def _prompt(video: str, smoothing: float = 0.5) -> dict:
    return {
        "1": {"class_type": "FlashPortraitExpressionModelLoader",
              "inputs": {"expression_encoder": TINY_MODELS.expression_encoder, "face_backend": "mediapipe"}},
        "2": {"class_type": "FlashPortraitExtractExpressionsFromVideo",
              "inputs": {"video": video, "expression_model": ["1", 0], "batch_size": 4, "max_frames": 4,
                         "smoothing": smoothing, "target_fps": 25.0, "path": ""}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 3]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


def _cached_nodes(entry: dict) -> set[str]:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_cached":
            return set(data["nodes"])
    raise AssertionError(f"no execution_cached message in {entry.get('status')}")


def _text(entry: dict, node_id: str) -> str:
    return "".join(entry["outputs"][node_id]["text"])


def test_file_node_runs_and_is_cached_until_the_file_changes(comfy_server) -> None:
    video = comfy_server.input_dir / "expression_cache_test.mp4"
    shutil.copy(DRIVING / "lp_d3.mp4", video)  # 30 fps

    def run(prompt: dict) -> dict:
        return comfy_client.run_prompt(comfy_server.url, prompt, timeout=600, is_alive=comfy_server.is_running)

    first = run(_prompt(video.name))
    assert _text(first, "3") == ("expression_cache_test.mp4: 3 frames, face found in 3, 0 filled by "
                                 "interpolation; 25 fps, resampled from 4 frames at 30 fps; smoothing 0.5; "
                                 "faces: mediapipe")
    assert _text(first, "4") == "3"
    # The file is new to this server, so its extraction runs; the model loader may be cached from an earlier graph
    # on the same server (its inputs are the same in every graph that uses the tiny expression encoder).
    assert "2" not in _cached_nodes(first)
    # The same graph again: nothing is recomputed.
    assert {"1", "2"} <= _cached_nodes(run(_prompt(video.name)))
    # Another setting: the extraction runs again, the model loader stays cached.
    changed = run(_prompt(video.name, smoothing=0.25))
    assert "1" in _cached_nodes(changed) and "2" not in _cached_nodes(changed)
    assert _text(changed, "3").endswith("smoothing 0.25; faces: mediapipe")
    # The file replaced under the same name (new content, new modification time): extraction runs again.
    shutil.copy(DRIVING / "lp_d0.mp4", video)  # 25 fps
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    replaced = run(_prompt(video.name, smoothing=0.25))
    assert "2" not in _cached_nodes(replaced)
    assert _text(replaced, "3").startswith("expression_cache_test.mp4: 4 frames, face found in 4, 0 filled by "
                                           "interpolation; 25 fps; smoothing 0.25")


def test_missing_file_is_refused_before_running(comfy_server) -> None:
    with pytest.raises(comfy_client.PromptRejected) as raised:
        comfy_client.queue_prompt(comfy_server.url, _prompt("no_such_video.mp4"))
    assert "'no_such_video.mp4' was not found in ComfyUI's input folder" in str(raised.value)
