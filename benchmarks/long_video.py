"""Long videos through the real ComfyUI server: wall time and peak memory for a 1-minute and a 10-minute output.

For each length a driving video is made by concatenating the real square clips of ``../shared/data/driving``
(every frame, re-encoded at 25 fps and a common size), the long-form workflow
(``workflows/flashportrait_long.json``: video file -> expressions -> sampler -> decode to MP4) runs on the tiny
models in a fresh server, and the server process's peak resident memory (VmHWM from /proc) and the prompt's
wall time (queue to finished, server start excluded) are printed with their ratios.

    .venv/bin/python benchmarks/long_video.py                        # 1 and 10 minutes
    .venv/bin/python benchmarks/long_video.py --minutes 1            # only the 1-minute run
    .venv/bin/python benchmarks/long_video.py --memory-table         # latent memory per window size (computed)
    .venv/bin/python benchmarks/long_video.py --after-extraction     # conditioning, sampler, decode in-process
    .venv/bin/python benchmarks/long_video.py --memory-check         # the host figure measured on this CPU

Driving videos and results go to benchmarks/out/long_video/ (git-ignored); the driving videos are reused.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from driving_clips import concatenate_clips

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import comfy_client, host  # noqa: E402
from scripts.workflow_prep import LONG_WORKFLOW, TINY_MODELS, Settings, load_ui_workflow, prepare_prompt  # noqa: E402

REFERENCE = REPO_ROOT.parent / "shared" / "data" / "reference" / "fp_case1.png"
# The square clips (480x480 or 512x512); the portrait-orientation and full-body ones would need cropping.
CLIPS = ("lp_d0.mp4", "lp_d3.mp4", "lp_d6.mp4", "lp_d10.mp4", "lp_d11.mp4", "lp_d12.mp4", "lp_d14.mp4",
         "lp_d18.mp4", "lp_d19.mp4", "lp_d20.mp4")
FPS = 25
OUT = REPO_ROOT / "benchmarks" / "out" / "long_video"


def make_driving_video(path: Path, seconds: float, side: int) -> int:
    """The square clips, cycled and re-timed to 25 fps (the 30 fps clips play 1.2x slower), ``seconds`` long."""
    return concatenate_clips(path, CLIPS, int(round(seconds * FPS)), side, FPS)


class PeakMemory:
    """Polls a process's VmRSS (for the curve) and reads its VmHWM (the kernel's exact peak) at the end."""

    def __init__(self, pid: int, interval: float = 1.0, log_path: Path | None = None):
        self.pid, self.interval, self.log_path = pid, interval, log_path
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _field_mb(self, name: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(name)

    def _poll(self) -> None:
        started = time.monotonic()
        log = open(self.log_path, "w") if self.log_path else None
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic() - started, self._field_mb("VmRSS")))
            if log is not None:  # progress survives a run that is stopped early
                log.write(f"{self.samples[-1][0]:.1f} s  RSS {self.samples[-1][1]:.1f} MB  "
                          f"peak {self._field_mb('VmHWM'):.1f} MB\n")
                log.flush()
        if log is not None:
            log.close()

    def __enter__(self) -> "PeakMemory":
        self.at_start_mb = self._field_mb("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = self._field_mb("VmHWM")


def run_once(video: Path, frames: int, settings: Settings, tiny_models: Path, run_dir: Path) -> dict:
    """One fresh server, one prompt; returns wall time, memory and the nodes' reports."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    server = host.start_server(tiny_models, run_dir / "input", run_dir / "output", run_dir / "temp")
    try:
        shutil.copy(REFERENCE, server.input_dir / REFERENCE.name)
        (server.input_dir / video.name).symlink_to(video.resolve())
        info = comfy_client.object_info(server.url)
        prompt = comfy_client.ui_to_api(load_ui_workflow(LONG_WORKFLOW), info)
        prepare_prompt(prompt, TINY_MODELS, REFERENCE.name, video.name, settings)
        with PeakMemory(server.process.pid, log_path=run_dir.with_suffix(".rss.log")) as memory:
            started = time.perf_counter()
            entry = comfy_client.run_prompt(server.url, prompt, timeout=4 * 3600, is_alive=server.is_running)
            wall = time.perf_counter() - started
    finally:
        server.stop()
    reports = {prompt[i]["_meta"]["title"]: "".join(o["text"]) for i, o in entry["outputs"].items() if "text" in o}
    videos = [f for f in comfy_client.output_files(entry) if f["filename"].endswith(".mp4")]
    output = run_dir / "output" / videos[0]["subfolder"] / videos[0]["filename"]
    import av

    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        written = sum(1 for _ in container.decode(stream))
        duration = float(container.duration / av.time_base)
    return {"driving_frames": frames, "wall_s": round(wall, 1), "peak_rss_mb": round(memory.peak_mb, 1),
            "rss_before_prompt_mb": round(memory.at_start_mb, 1), "output_frames": written,
            "output_duration_s": round(duration, 2), "reports": reports,
            "rss_curve_mb": [(round(t, 1), round(m, 1)) for t, m in memory.samples[:: max(1, len(memory.samples)
                                                                                           // 200)]]}


def latent_memory_mb(height: int, width: int, latent_frames: int, window: int, overlap: int, alp: bool,
                     probe_blocks: int = 6, dit_dim: int = 5120, alp_order: int = 1) -> dict:
    """Memory of the window loop's own tensors (float32), from their sizes; the model's weights and activations
    come on top. Host: noise + latents + blend accumulator + the Euler update's two temporaries (5 full
    latents), plus ALP's per-window state (order + 2 window latents and the probed block outputs). Device: the
    window's latents and its velocity, plus ALP's state of the window being sampled."""
    from flashportrait_core.sampling.windows import plan_windows

    frame = 16 * (height // 8) * (width // 8) * 4
    full, one_window = frame * latent_frames, frame * min(window, latent_frames)
    windows = len(plan_windows(latent_frames, window, overlap).windows)
    tokens = min(window, latent_frames) * (height // 16) * (width // 16)
    # BlockProbe keeps every stride-th token and channel: at most 1024 tokens x 64 channels a block.
    probed = -(-tokens // -(-tokens // 1024)) * -(-dit_dim // -(-dit_dim // 64))
    alp_window = (alp_order + 2) * one_window + probe_blocks * probed * 4 if alp else 0
    mb = 2 ** 20
    return {"windows": windows, "full_latents_mb": full / mb, "host_mb": (5 * full + windows * alp_window) / mb,
            "device_mb": (2 * one_window + alp_window) / mb, "alp_per_window_mb": alp_window / mb}


def memory_table() -> None:
    print("| output | latent frames | window / overlap | windows | host, ALP off | host, ALP on | device (latents "
          "+ ALP) |")
    print("|---|---|---|---|---|---|---|")
    for height, width in ((720, 720), (416, 720)):
        for minutes in (1, 10):
            latent_frames = (minutes * 60 * FPS) // 4 + 1
            for window, overlap in ((21, 10), (51, 30), (81, 40)):
                off = latent_memory_mb(height, width, latent_frames, window, overlap, alp=False)
                on = latent_memory_mb(height, width, latent_frames, window, overlap, alp=True)
                print(f"| {width}x{height}, {minutes} min | {latent_frames} | {window} / {overlap} | {off['windows']} "
                      f"| {off['host_mb'] / 1024:.1f} GB | {on['host_mb'] / 1024:.1f} GB | {off['device_mb']:.0f} + "
                      f"{on['alp_per_window_mb']:.0f} MB |")


def memory_check(height: int = 256, width: int = 256, latent_frames: int = 376, window: int = 21,
                 overlap: int = 10) -> None:
    """Peak RSS of the window loop on this CPU (storage = compute) against the computed host figure."""
    import resource

    import torch

    from flashportrait_core.sampling.loop import sample_flow_windows
from flashportrait_core.sampling.schedules import simple_sigmas
    from flashportrait_core.sampling.windows import plan_windows

    torch.set_num_threads(1)
    plan = plan_windows(latent_frames, window, overlap)
    sigmas = simple_sigmas(3, 5.0)
    warm = torch.zeros(1, 16, window, height // 8, width // 8)  # allocator and kernels warmed up, then freed
    sample_flow_windows(warm, sigmas, plan_windows(window, window, 0), lambda x, s, k, i: x * 0.5)
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    noise = torch.randn(1, 16, latent_frames, height // 8, width // 8)
    sample_flow_windows(noise, sigmas, plan, lambda x, s, k, i: x * 0.5)
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    computed = latent_memory_mb(height, width, latent_frames, window, overlap, alp=False)
    print(f"{width}x{height}, {latent_frames} latent frames, windows {window}/{overlap}: peak RSS grew "
          f"{measured:.1f} MB; computed host {computed['host_mb']:.1f} MB + one window "
          f"{computed['device_mb']:.1f} MB (compute device = host here)")


def stage_worker(minutes: float, max_side: int, steps: int, window: int, overlap: int, acceleration: str) -> dict:
    """Conditioning, sampler and decode nodes in this process (as the server runs them, in inference mode) on
    stand-in expression features for ``minutes`` of 25 fps driving video; wall time and peak RSS per stage."""
    import resource

    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from pack import import_pack

    pack = import_pack()
    import comfy.sd
    import folder_paths

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    tiny = REPO_ROOT / ".models" / "tiny"
    for folder in ("diffusion_models", "vae", "flashportrait", "flashportrait_conditioning"):
        folder_paths.add_model_folder_path(folder, str(tiny / folder))
    pack.nodes.register_model_folders()
    folder_paths.set_output_directory(str(OUT / f"stages_{minutes:g}min"))
    nodes, core = pack.nodes, pack.flashportrait_core
    with torch.inference_mode():
        model = nodes.loaders.FlashPortraitModelLoader.execute(TINY_MODELS.wan, TINY_MODELS.transformer,
                                                               "default").result[0]
        vae = comfy.sd.VAE(sd=core.checkpoints.load_state_dict(tiny / "vae" / TINY_MODELS.vae))
        encoder = nodes.loaders.FlashPortraitPortraitEncoderLoader.execute(TINY_MODELS.portrait_encoder).result[0]
        positive, negative, clip_output = nodes.conditioning.FlashPortraitLoadConditioning.execute(
            TINY_MODELS.precomputed_conditioning).result
        reference = torch.from_numpy(np.asarray(Image.open(REFERENCE).convert("RGB"), dtype=np.float32) / 255)[None]
        # Stand-in for the extraction node's output (554 features per driving frame).
        features = torch.randn(int(round(minutes * 60 * FPS)), 554, generator=torch.Generator().manual_seed(0))
        stages, loaded = {}, peak_mb()
        started = time.perf_counter()
        emotion = core.emotion_conditioning.build_emotion_conditioning(encoder, features)
        stages["conditioning"] = (time.perf_counter() - started, peak_mb())
        windows = nodes.windows.FlashPortraitWindows.execute(window, overlap).result[0]
        started = time.perf_counter()
        latent, report = nodes.sampler.FlashPortraitSampler.execute(
            model=model, positive=positive, negative=negative, clip_vision_output=clip_output, vae=vae,
            reference_image=reference, emotion=emotion, windows=windows, seed=1, steps=steps, shift=5.0,
            max_side=max_side, acceleration=acceleration).result
        stages["sampler"] = (time.perf_counter() - started, peak_mb())
        started = time.perf_counter()
        path = nodes.decode.FlashPortraitDecodeToVideo.execute(latent, vae, float(FPS), "video/stages", 19,
                                                               True).result[0]
        stages["decode"] = (time.perf_counter() - started, peak_mb())
    import av

    with av.open(path) as container:
        written = sum(1 for _ in container.decode(video=0))
    return {"minutes": minutes, "latent_frames": int(latent["samples"].shape[2]), "output_frames": written,
            "peak_rss_after_loading_mb": round(loaded, 1),
            "stages": {name: {"seconds": round(t, 1), "peak_rss_mb": round(m, 1)} for name, (t, m) in stages.items()},
            "sampler_report": report.splitlines()[0]}


def after_extraction(args) -> None:
    """Each length in a fresh process: peak RSS and wall time of conditioning + sampler + decode."""
    import subprocess

    results = {}
    for minutes in args.minutes:
        command = [sys.executable, __file__, "--stage-worker", str(minutes), "--max-side", str(args.max_side),
                   "--steps", str(args.steps), "--window", str(args.window), "--overlap", str(args.overlap),
                   "--acceleration", args.acceleration]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.exit(f"{minutes:g} min worker failed:\n{completed.stderr[-3000:]}")
        results[minutes] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(json.dumps(results[minutes]), flush=True)
    (OUT / "after_extraction.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    if len(results) >= 2:
        short, long = results[min(results)], results[max(results)]
        wall = {r["minutes"]: sum(s["seconds"] for s in r["stages"].values()) for r in (short, long)}
        peak = {r["minutes"]: r["stages"]["decode"]["peak_rss_mb"] for r in (short, long)}
        scale = long["minutes"] / short["minutes"]
        print(f"peak RSS {peak[long['minutes']] / peak[short['minutes']]:.3f}x; wall time "
              f"{wall[long['minutes']] / wall[short['minutes']]:.2f}x for {scale:g}x the length "
              f"({wall[long['minutes']] / wall[short['minutes']] / scale:.3f} of linear)")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # so the server is stopped too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--side", type=int, default=256, help="driving video side (pixels)")
    parser.add_argument("--max-side", type=int, default=64, help="output's longest side")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--acceleration", default="off",
                        help="ALP preset (with 2 steps every step is computed anyway)")
    parser.add_argument("--memory-table", action="store_true", help="print the computed latent memory table")
    parser.add_argument("--memory-check", action="store_true", help="measure the window loop's host memory")
    parser.add_argument("--after-extraction", action="store_true",
                        help="conditioning, sampler and decode in-process on stand-in features, per length")
    parser.add_argument("--stage-worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage_worker is not None:
        print(json.dumps(stage_worker(args.stage_worker, args.max_side, args.steps, args.window, args.overlap,
                                      args.acceleration)))
        return
    if args.after_extraction:
        OUT.mkdir(parents=True, exist_ok=True)
        after_extraction(args)
        return
    if args.memory_table or args.memory_check:
        if args.memory_table:
            memory_table()
        if args.memory_check:
            memory_check()
        return

    tiny_models = REPO_ROOT / ".models" / "tiny"
    if not (tiny_models / "vae").is_dir():
        sys.exit(f"{tiny_models} is missing: run .venv/bin/python scripts/make_tiny_models.py --out {tiny_models}")
    host.provision(log=lambda message: print(message, file=sys.stderr))
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for minutes in args.minutes:
        video = OUT / f"driving_{minutes:g}min_{args.side}.mp4"
        made = time.perf_counter()
        frames = make_driving_video(video, minutes * 60, args.side)
        print(f"{minutes:g} min driving video: {frames} frames at {FPS} fps, {args.side}x{args.side} "
              f"({time.perf_counter() - made:.0f} s to make)", flush=True)
        settings = Settings(seed=1, steps=args.steps, max_side=args.max_side, window_length=args.window,
                            window_overlap=args.overlap, acceleration=args.acceleration,
                            filename_prefix=f"video/long_{minutes:g}min")
        result = run_once(video, frames, settings, tiny_models, OUT / f"run_{minutes:g}min")
        results[minutes] = result
        print(f"{minutes:g} min: wall {result['wall_s']} s, peak RSS {result['peak_rss_mb']} MB "
              f"(before the prompt {result['rss_before_prompt_mb']} MB), output {result['output_frames']} frames, "
              f"{result['output_duration_s']} s", flush=True)
        for title, text in result["reports"].items():
            print(f"  [{title}] " + text.splitlines()[0] if text else "", flush=True)
        (OUT / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    if len(results) >= 2:
        short, long = (results[m] for m in sorted(results)[:1] + sorted(results)[-1:])
        length_ratio = long["driving_frames"] / short["driving_frames"]
        print(f"peak RSS {long['peak_rss_mb'] / short['peak_rss_mb']:.3f}x (target <= 1.10); wall time "
              f"{long['wall_s'] / short['wall_s']:.2f}x for {length_ratio:.1f}x the length "
              f"({long['wall_s'] / short['wall_s'] / length_ratio:.3f} of linear; target 0.9-1.1)")


if __name__ == "__main__":
    main()
