"""Peak memory of Evaluate on a written video stays flat as the video gets longer (streamed, frames never held)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from evaluate_memory import make_video  # noqa: E402


def _run(video: Path) -> dict:
    """Extraction and evaluation of `video` in a fresh process (real face detection, the recognition model run
    by onnxruntime, a small stand-in expression encoder so the test stays fast); returns its JSON line."""
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "evaluate_memory.py"), "--worker", str(video),
         "--encoder", "small"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_peak_memory_is_flat_between_a_short_and_a_six_times_longer_video(tmp_path: Path) -> None:
    """60 and 360 frames (2.4 s and 14.4 s, 512x512): peak RSS within 10%.

    Holding the longer video's frames would add 360 x 512 x 512 x 3 bytes = 283 MB as uint8 (four times that as
    float). The 10 s vs 60 s measurement with the real-size encoder is benchmarks/evaluate_memory.py.
    """
    short_video, long_video = tmp_path / "short.mp4", tmp_path / "long.mp4"
    assert (make_video(short_video, 60), make_video(long_video, 360)) == (60, 360)
    short, long = _run(short_video), _run(long_video)
    assert (short["frames"], long["frames"]) == (60, 360)
    assert long["faces"] == 360 and long["boundaries"] > 0  # 90 latent frames: more than one window of 51
    assert long["peak_rss_mb"] < 1.10 * short["peak_rss_mb"], (short, long)
