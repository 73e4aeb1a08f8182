"""Memory and interrupt latency of streaming decoding (FlashPortrait Decode to Video File) at 720, 1024 and 2048 px.

For each case a fresh process builds a Wan 2.1 VAE with random weights through ComfyUI's own loader (``--width 16``:
the tiny model of the tests; ``--width 96``: the published VAE's width), decodes latent frames 0 and 1 of a
square video (frame 1 gives 4 video frames, the cost of every later frame) whole or in ComfyUI's tiles, and prints
one JSON line: peak resident memory above the loaded model, seconds per latent frame (the longest an interrupt
waited when decoding was checked only between latent frames), and how long an interrupt raised in the middle of
latent frame 1 took to stop it now that every decoder layer checks (median of ``--interrupts`` tries). ComfyUI's own estimate of one
frame's decoding memory is printed beside it (the figure that picks tiles on a CPU).

    .venv/bin/python benchmarks/decode_memory.py                    # tiny width: 720, 1024, 2048; whole and tiled
    .venv/bin/python benchmarks/decode_memory.py --width 96 --sides 720 --modes whole
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def worker(width: int, side: int, mode: str, interrupts: int) -> dict:
    import torch

    from pack import import_pack

    pack = import_pack()
    import comfy.model_management
    import comfy.sd

    from scripts.make_tiny_models import wan_vae_state_dict

    torch.manual_seed(0)
    vae = comfy.sd.VAE(sd=wan_vae_state_dict(seed=0, dim=width))
    latents = torch.randn(1, 16, 2, side // 8, side // 8)
    stream = pack.nodes.wan_vae_stream
    tiled = mode == "tiled"

    seconds = []
    list(stream.StreamDecoder(vae, latents[:, :, :1], tiled=tiled))  # warm-up: model placed, kernels chosen
    baseline = _rss_mb()
    started = time.perf_counter()
    for _ in stream.StreamDecoder(vae, latents, tiled=tiled):
        seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline

    latencies = []
    for _ in range(interrupts):  # interrupt halfway through latent frame 1
        asked = {}

        def interrupt() -> None:
            asked["at"] = time.perf_counter()
            comfy.model_management.interrupt_current_processing(True)

        timer = threading.Timer(seconds[1] / 2, interrupt)
        try:
            for index, _ in enumerate(stream.StreamDecoder(vae, latents, tiled=tiled)):
                if index == 0:  # latent frame 0 is out: frame 1 starts now
                    timer.start()
            latencies.append(None)  # finished before the interrupt
        except comfy.model_management.InterruptProcessingException:
            latencies.append(time.perf_counter() - asked["at"])
        finally:
            timer.cancel()
            comfy.model_management.interrupt_current_processing(False)
    measured = [value for value in latencies if value is not None]
    return {"vae_width": width, "side": side, "mode": mode, "peak_above_model_mb": round(peak),
            "comfyui_estimate_mb": round(stream.frame_memory(vae, latents) / 2**20),
            "seconds_latent_frame_0": round(seconds[0], 2), "seconds_latent_frame_1": round(seconds[1], 2),
            "interrupt_seconds_median": round(statistics.median(measured), 3) if measured else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16, help="VAE width (16: tiny, 96: the published VAE's)")
    parser.add_argument("--sides", type=int, nargs="+", default=[720, 1024, 2048])
    parser.add_argument("--modes", nargs="+", default=["whole", "tiled"], choices=["whole", "tiled"])
    parser.add_argument("--interrupts", type=int, default=1, help="interrupted decodes per case")
    parser.add_argument("--worker", nargs=3, metavar=("WIDTH", "SIDE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        width, side, mode = args.worker
        print(json.dumps(worker(int(width), int(side), mode, args.interrupts)), flush=True)
        return
    for side in args.sides:
        for mode in args.modes:
            result = subprocess.run([sys.executable, __file__, "--worker", str(args.width), str(side), mode,
                                     "--interrupts", str(args.interrupts)], capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else json.dumps({"side": side, "mode": mode, "failed": result.stderr[-500:]}),
                  flush=True)


if __name__ == "__main__":
    main()
