"""Soak run: many back-to-back animations with the tiny models through one ComfyUI server's API.

Each run is the whole pipeline (expression extraction from a real driving video, emotion conditioning, the
windowed sampler, decoding to an MP4) with a new seed and smoothing, so ComfyUI's cache cannot skip the work;
the model loaders stay cached as in normal use. After every run the server process's resident memory (VmRSS)
is read. It passes when no run failed, the memory after the warm-up runs stays within the tolerance of the
first value after the warm-up runs (default: 10 runs; within 10%), and no temporary or resume file is left
behind. Every run must write its MP4.

    .venv/bin/python benchmarks/soak.py                 # 50 runs
    .venv/bin/python benchmarks/soak.py --runs 10 --json soak.json

Exit status 0 on a pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import comfy_client, host  # noqa: E402
from scripts.workflow_prep import TINY_MODELS, tiny_animation_prompt  # noqa: E402

DRIVING = REPO_ROOT / "../shared/data/driving/lp_d0.mp4"
REFERENCE = REPO_ROOT / "../shared/data/reference/fp_case1.png"
TINY_MODELS_DIR = REPO_ROOT / ".models" / "tiny"


def tiny_animation_graph(run: int) -> dict:
    """5 driving frames (2 latent frames), 2 steps, 32 px; seed and smoothing change per run, so the extraction,
    the sampler and the decoder all run every time."""
    graph = tiny_animation_prompt(DRIVING.name, REFERENCE.name, run, smoothing=round(0.2 + 0.01 * (run % 50), 2),
                                  steps=2)
    graph["11"] = {"class_type": "FlashPortraitDecodeToVideo",
                   "inputs": {"latent": ["10", 0], "vae": ["4", 0], "fps": 25.0, "filename_prefix": "soak/run",
                              "crf": 30, "drop_reference_frame": True}}
    return graph


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """Fill every required input the graph leaves out with the node's default."""
    for node in prompt.values():
        for name, spec in (object_info[node["class_type"]]["input"].get("required") or {}).items():
            if name not in node["inputs"] and len(spec) > 1 and "default" in spec[1]:
                node["inputs"][name] = spec[1]["default"]
    return prompt


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def leftover_files(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file())


def ensure_tiny_models(models_dir: Path) -> None:
    if (models_dir / "diffusion_models" / TINY_MODELS.wan).is_file():
        return
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_tiny_models.py"), "--out", str(models_dir)],
                   check=True, cwd=REPO_ROOT)


def soak(runs: int, warmup: int, tolerance: float, models_dir: Path, work_dir: Path) -> dict:
    ensure_tiny_models(models_dir)
    input_dir, output_dir, temp_dir = work_dir / "input", work_dir / "output", work_dir / "temp"
    input_dir.mkdir(parents=True)
    shutil.copy(DRIVING, input_dir / DRIVING.name)
    shutil.copy(REFERENCE, input_dir / REFERENCE.name)
    server = host.start_server(models_dir, input_dir, output_dir, temp_dir, comfyui_dir=host.provision(log=print))
    records, failures = [], []
    try:
        object_info = comfy_client.object_info(server.url)
        for run in range(runs):
            started = time.perf_counter()
            try:
                comfy_client.run_prompt(server.url, with_defaults(tiny_animation_graph(run), object_info),
                                        timeout=600, is_alive=server.is_running)
            except (comfy_client.ComfyError, TimeoutError) as error:
                failures.append(f"run {run}: {str(error).splitlines()[0]}")
            records.append({"run": run, "seconds": round(time.perf_counter() - started, 2),
                            "rss_mb": round(rss_mb(server.process.pid), 1)})
            print(f"run {run:3d}: {records[-1]['seconds']:6.2f} s, server RSS {records[-1]['rss_mb']:8.1f} MB",
                  flush=True)
    finally:
        server.stop()
    measured = [r["rss_mb"] for r in records[warmup:]] or [r["rss_mb"] for r in records]
    baseline = measured[0]
    growth = (max(measured) - baseline) / baseline
    second_half = [r["rss_mb"] for r in records[len(records) // 2:]]
    videos = sorted(output_dir.rglob("*.mp4"))
    leftovers = leftover_files(temp_dir, output_dir / "flashportrait_resume")
    summary = {"runs": runs, "failed": failures, "warmup_runs": warmup, "rss_first_mb": records[0]["rss_mb"],
               "rss_baseline_mb": baseline, "rss_max_mb": max(measured), "rss_last_mb": measured[-1],
               "rss_growth": round(growth, 4), "tolerance": tolerance,
               "rss_second_half_change": round((second_half[-1] - second_half[0]) / second_half[0], 4), "videos_written": len(videos),
               "leftover_temp_files": leftovers,
               "mean_run_seconds": round(sum(r["seconds"] for r in records) / len(records), 2),
               "records": records}
    summary["passed"] = not failures and growth <= tolerance and not leftovers and len(videos) == runs
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10,
                        help="runs before the memory baseline (models load, MediaPipe and allocator pools fill; "
                             "measured: the server's memory levels off after about 10 runs)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed RSS growth after the warm-up")
    parser.add_argument("--models", type=Path, default=TINY_MODELS_DIR)
    parser.add_argument("--json", type=Path, help="write the summary and per-run records here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flashportrait-soak-") as work_dir:
        summary = soak(args.runs, args.warmup, args.tolerance, args.models, Path(work_dir))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
