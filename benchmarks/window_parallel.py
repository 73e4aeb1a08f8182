"""Window-parallel sampling: 1 against 2 CPU workers on the tiny models, the transport's speed, and the scaling
to expect at 720p on several GPUs, computed from the per-window cost and the transfer sizes.

    .venv/bin/python benchmarks/window_parallel.py measure [--repeats 3] [--steps 8] [--max-side 128]
    .venv/bin/python benchmarks/window_parallel.py transfer [--megabytes 47]
    .venv/bin/python benchmarks/window_parallel.py table [--tflops 400] [--gbps 0.6]

measure: one ComfyUI server; the sampler node in ComfyUI's own process and on FlashPortrait Devices ``cpu x2``
(threads 1 and 2 per worker), interleaved, a new seed per repeat (ComfyUI would otherwise reuse the cached
result); the first run of each kind warms up (worker start, model loads) and is not counted. Reads the denoising
time from the sampler's report and the bytes the pool moved from /flashportrait/devices.

transfer: two processes on this machine exchange one window's latents through the pool's own Channel (gloo over
loopback), as a window step does (latents there, the prediction back).

table: computed, not measured: the DiT FLOPs of one window pass of Wan 2.1 14B at 720p (linear layers and
attention), at an assumed sustained throughput, against the bytes a window step moves, for 1 to 8 workers.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DATA = REPO_ROOT.parent / "shared" / "data"
REFERENCE = DATA / "reference" / "fp_case1.png"
DRIVING = DATA / "driving" / "lp_d0.mp4"
REPORT = re.compile(r"(\d+) window\(s\) x (\d+) steps \(\w+\), (\d+) DiT passes \([^)]*\), [\d.]+ s "
                    r"\(denoising ([\d.]+) s\)")


# -- measure: through the server --------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> None:
    from scripts import comfy_client, host
    from scripts.make_tiny_models import write_tiny_models
    from scripts.workflow_prep import tiny_animation_prompt

    models_dir = REPO_ROOT / ".models" / "tiny"
    write_tiny_models(models_dir)
    comfy_dir = host.provision(log=lambda message: None)
    kinds = {"one process": None, "cpu x2, 1 thread each": ("cpu x2", 1), "cpu x2, 2 threads each": ("cpu x2", 2)}
    kinds = {name: spec for name, spec in kinds.items() if spec is None or spec[1] in args.worker_threads}
    env = None
    if args.server_threads:  # ComfyUI's own process (and the one-process sampling) with this many torch threads
        import os

        env = dict(os.environ, OMP_NUM_THREADS=str(args.server_threads), MKL_NUM_THREADS=str(args.server_threads))
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    moved: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        with host.start_server(models_dir, work / "in", work / "out", work / "tmp", comfyui_dir=comfy_dir,
                               env=env) as server:
            for path in (REFERENCE, DRIVING):
                shutil.copy(path, server.input_dir / path.name)
            windows = None
            for repeat in range(args.repeats + 1):
                for kind, spec in kinds.items():
                    prompt = tiny_animation_prompt(DRIVING.name, REFERENCE.name, seed=100 + repeat,
                                                   window_length=args.window, overlap=args.overlap,
                                                   steps=args.steps)
                    prompt["6"]["inputs"]["max_frames"] = args.frames
                    prompt["10"]["inputs"]["max_side"] = args.max_side
                    if spec is not None:
                        prompt["60"] = {"class_type": "FlashPortraitDevices",
                                        "inputs": {"devices": spec[0], "threads": spec[1], "timeout_s": 600}}
                        prompt["10"]["inputs"]["devices"] = ["60", 0]
                    prompt["11"] = {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0],
                                                                           "filename_prefix": "latents/bench"}}
                    entry = comfy_client.run_prompt(server.url, prompt, timeout=1800)
                    text = entry["outputs"]["10"]["text"][0]
                    match = REPORT.search(text)
                    windows = int(match.group(1))
                    if repeat > 0:  # repeat 0 warms up: model loads, worker start
                        times[kind].append(float(match.group(4)))
                    if spec is not None:
                        _, status = comfy_client._request(server.url + "/flashportrait/devices")
                        moved[kind] = status["last_job"]["bytes_sent"] + status["last_job"]["bytes_received"]
                    print(f"repeat {repeat} {kind}: denoising {match.group(4)} s", file=sys.stderr)
    base = statistics.median(times["one process"])
    print(f"{args.frames} driving frames, {windows} windows of {args.window} (overlap {args.overlap}), "
          f"{args.steps} steps, {args.max_side} px, tiny models; ComfyUI's process with "
          f"{args.server_threads or 'default'} torch threads; medians of {args.repeats} repeats\n")
    print("| sampling | denoising s, repeats | median s | speed-up | MB moved per run |")
    print("|---|---|---|---|---|")
    for kind, values in times.items():
        median = statistics.median(values)
        mb = f"{moved[kind] / 1e6:.1f}" if kind in moved else "-"
        print(f"| {kind} | {' / '.join(f'{v:.1f}' for v in values)} | {median:.2f} | {base / median:.2f}x | {mb} |")


# -- transfer: the pool's Channel between two processes ----------------------------------------------------------

def _peer(port: int, rounds: int) -> None:
    """The second process: sends every window it receives straight back, as a worker's prediction."""
    import datetime

    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from pack import import_pack

    pool = import_pack().nodes.window_pool
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
    channel = pool.Channel(dist.ProcessGroupGloo(store, 1, 2, pool.GLOO_TIMEOUT), 0, 2, 1)
    for _ in range(rounds):
        message = channel.receive()
        channel.send({"op": "result", "prediction": message["x"]})


def transfer(args: argparse.Namespace) -> None:
    import datetime
    import multiprocessing

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from pack import import_pack

    pool = import_pack().nodes.window_pool
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    peer = multiprocessing.get_context("spawn").Process(target=_peer, args=(store.port, args.rounds))
    peer.start()
    channel = pool.Channel(dist.ProcessGroupGloo(store, 0, 2, pool.GLOO_TIMEOUT), 1, 1, 2)
    x = torch.randn(int(args.megabytes * 1e6 / 4))
    seconds = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        channel.send({"op": "window", "x": x})
        back = channel.receive()["prediction"]
        seconds.append(time.perf_counter() - started)
        assert torch.equal(back, x)
    peer.join()
    median = statistics.median(seconds[1:])  # the first round sets up the connection's buffers
    print(f"{args.megabytes:g} MB there and back ({2 * args.megabytes:g} MB): median {median * 1e3:.0f} ms over "
          f"{args.rounds - 1} rounds, {2 * args.megabytes / 1e3 / median:.2f} GB/s")


# -- table: expected scaling at 720p, computed -------------------------------------------------------------------

# Wan 2.1 I2V 14B (config of the published checkpoint): width, blocks, FFN width; the text and CLIP contexts.
DIM, BLOCKS, FFN, TEXT_TOKENS, IMAGE_TOKENS, EMOTION_TOKENS, EMOTION_DIM = 5120, 40, 13824, 512, 257, 97, 2048


def pass_flops(latent_frames: int, height: int, width: int) -> float:
    """Multiply-adds x 2 of one DiT pass over a window: per block self-attention (QKV and output projections, QK^T
    and AV over all tokens), cross-attention (queries and output on the video tokens, keys and values of the
    contexts, the two attentions), the NFEB emotion attention (frame-local) and the FFN. Embeddings and the head
    are left out (under 1%)."""
    tokens = latent_frames * (height // 16) * (width // 16)
    per_frame = tokens // latent_frames
    context = TEXT_TOKENS + IMAGE_TOKENS
    linear = tokens * (4 * DIM * DIM + 2 * DIM * DIM + 2 * DIM * FFN) + context * 2 * DIM * DIM
    attention = 2 * tokens * tokens * DIM + 2 * tokens * context * DIM
    emotion = latent_frames * (EMOTION_TOKENS * 2 * EMOTION_DIM * DIM + 2 * per_frame * EMOTION_TOKENS * DIM)
    return 2.0 * BLOCKS * (linear + attention + emotion)


def table(args: argparse.Namespace) -> None:
    from flashportrait_core.sampling.guidance import guidance_passes
    from flashportrait_core.sampling.windows import plan_windows

    passes = len(guidance_passes(4.0, 1.0))  # the published emo_cfg 4, text_cfg 1: posi and no_emo
    gbps = args.gbps * 1e9
    print(f"Assumed: {args.tflops:g} TFLOP/s sustained per GPU (bf16), {args.gbps:g} GB/s between the coordinator "
          f"and each worker (the transfer command measures it), "
          f"{passes} guidance passes per window step (published emo_cfg 4, text_cfg 1), windows 51 / 30.\n")
    print("| output | latent frames | windows | window step (compute) | moved per window step | workers | "
          "windows per worker and step | expected speed-up | transfer share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for width, height in ((1280, 720), (720, 720)):
        for minutes in (1, 10):
            latent_frames = (minutes * 60 * 25) // 4 + 1
            plan = plan_windows(latent_frames, 51, 30)
            count = len(plan.windows)
            step_s = passes * pass_flops(51, height, width) / (args.tflops * 1e12)
            window_bytes = 16 * 51 * (height // 8) * (width // 8) * 4
            moved = 2 * window_bytes  # the window's latents there, its prediction back (float32)
            for workers in (1, 2, 4, 8):
                per_worker = math.ceil(count / workers)
                if workers == 1:
                    elapsed, share = count * step_s, 0.0
                else:
                    # The coordinator sends and receives one window at a time per worker, from one thread: a
                    # worker waits for its own transfer; the transfers of different workers overlap with the
                    # others' compute, except that the coordinator's link is shared.
                    transfer_s = moved / gbps
                    elapsed = per_worker * (step_s + transfer_s) + max(0.0, workers * transfer_s - step_s)
                    share = per_worker * transfer_s / elapsed
                speedup = count * step_s / elapsed
                print(f"| {width}x{height}, {minutes} min | {latent_frames} | {count} | {step_s:.0f} s | "
                      f"{moved / 1e6:.0f} MB | {workers} | {per_worker} | {speedup:.2f}x | {100 * share:.2f}% |")
    tokens_mb = 51 * EMOTION_TOKENS * EMOTION_DIM * 4 / 1e6
    concat_mb = 17 * 51 * 90 * 160 * 4 / 1e6
    print(f"\nOnce per run and worker: each of its windows' emotion tokens ({tokens_mb:.0f} MB a window at width "
          f"{EMOTION_DIM}), the reference condition ({concat_mb:.0f} MB at 1280x720, latent and mask) and the text "
          f"and CLIP conditioning (about {(TEXT_TOKENS * 4096 + IMAGE_TOKENS * 1280) * 4 / 1e6:.0f} MB).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure")
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--steps", type=int, default=8)
    run.add_argument("--frames", type=int, default=33, help="driving frames (4 per latent frame, +1)")
    run.add_argument("--window", type=int, default=3)
    run.add_argument("--overlap", type=int, default=1)
    run.add_argument("--max-side", type=int, default=128)
    run.add_argument("--server-threads", type=int, default=0,
                     help="torch threads of ComfyUI's process (OMP_NUM_THREADS); 0: torch's default")
    run.add_argument("--worker-threads", type=int, nargs="+", default=[1, 2], help="threads per CPU worker to run")
    moved = commands.add_parser("transfer")
    moved.add_argument("--megabytes", type=float, default=47.0, help="one 51-frame window at 1280x720: 47 MB")
    moved.add_argument("--rounds", type=int, default=6)
    computed = commands.add_parser("table")
    computed.add_argument("--tflops", type=float, default=400.0,
                          help="sustained bf16 TFLOP/s of one GPU (H100 dense peak: 989; ~40%% is typical)")
    computed.add_argument("--gbps", type=float, default=0.6,
                          help="GB/s between the coordinator and a worker (0.6: the transfer command, CPU machine)")
    args = parser.parse_args()
    {"measure": measure, "transfer": transfer, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
