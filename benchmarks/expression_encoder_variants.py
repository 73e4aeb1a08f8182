"""Ways to run the PD-FGC encoder on this CPU, timed in one run: frames/s and the difference from the published forward.

Variants (all float32, eval mode, on real aligned crops of `--video`):
  published, per frame        the module's forward in PyTorch's default layout, one crop at a time
  module, channels-last       the module's forward, channels-last, micro-batches of 4 (the previous default)
  cpu forward                 `pdfgc_cpu` with oneDNN-prepacked weights, micro-batches of 4 (the default)
  cpu forward, plain conv     `pdfgc_cpu` with channels-last `conv2d` instead of prepacked weights
  jit freeze                  torch.jit.trace + freeze + optimize_for_inference of the module, micro-batches of 4
  torch.compile (--compile)   inductor with frozen weights, micro-batches of 4; its compile time prints apart
Each variant runs with 2 and with 1 intra-op thread(s) (`--threads`), `--repeats` times interleaved; medians print.

    .venv/bin/python benchmarks/expression_encoder_variants.py --crops 8 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flashportrait_core.expression import load_fan_encoder, random_fan_encoder_state_dict  # noqa: E402
from flashportrait_core.expression.pdfgc import CPU_MICRO_BATCH, expression_features  # noqa: E402
from flashportrait_core.expression.pdfgc_cpu import build_cpu_plan, cpu_expression_forward  # noqa: E402

DEFAULT_VIDEO = REPO_ROOT / "../shared/data/driving/lp_d3.mp4"


def real_crops(video: Path, count: int) -> torch.Tensor:
    """Aligned crops of the first `count` frames, as extraction makes them."""
    from flashportrait_core.expression import extract as extract_module
    from flashportrait_core.expression.alignment import similarity_to_template
    from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
    from flashportrait_core.expression.video import iter_video_chunks

    chunk = torch.from_numpy(next(iter_video_chunks(video, count, count)))
    with MediaPipeFaceBackend() as backend:
        track = extract_module.track_faces([chunk], backend)
    stable = extract_module.stabilize_track(track, 30.0, 0.0)
    transforms = similarity_to_template(torch.from_numpy(stable.points).to(torch.float64))
    return extract_module.align_chunk(chunk, transforms, torch.device("cpu"))


def concatenated(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([parts["headpose"], parts["eye"], parts["emo"], parts["mouth"]], dim=1)


class FeaturesModule(torch.nn.Module):
    """The encoder with one tensor out (what tracing and compiling need)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return concatenated(self.encoder(crops))


def micro_batched(function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(crops: torch.Tensor) -> torch.Tensor:
        crops = crops.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.cat([function(part) for part in crops.split(CPU_MICRO_BATCH)])
    return run


def variants(state: dict[str, torch.Tensor], crops: torch.Tensor, compile_too: bool) -> dict[str, Callable]:
    published = load_fan_encoder(state)
    module = load_fan_encoder(state)
    fast = load_fan_encoder(state)
    plain_plan = build_cpu_plan(fast, prepack=False)

    def per_frame(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([concatenated(published(crop[None].contiguous())) for crop in batch])

    found = {
        "published, per frame": per_frame,
        "module, channels-last": lambda batch: expression_features(module, batch, cpu_forward=False),
        "cpu forward": lambda batch: expression_features(fast, batch),
        "cpu forward, plain conv": micro_batched(lambda part: cpu_expression_forward(fast, plain_plan, part)),
    }
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript deprecation notices
        start = time.perf_counter()
        traced = torch.jit.trace(FeaturesModule(copy.deepcopy(module)).eval(),
                                 crops[:CPU_MICRO_BATCH].contiguous(memory_format=torch.channels_last))
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        print(f"jit freeze: built in {time.perf_counter() - start:.1f} s", flush=True)
    found["jit freeze"] = micro_batched(frozen)
    if compile_too:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(FeaturesModule(copy.deepcopy(module)).eval(), dynamic=False)
        start = time.perf_counter()
        micro_batched(compiled)(crops[:CPU_MICRO_BATCH])
        print(f"torch.compile: first call (compiling) {time.perf_counter() - start:.1f} s", flush=True)
        found["torch.compile"] = micro_batched(compiled)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--crops", type=int, default=8, help="a multiple of 4 keeps every micro-batch full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    args = parser.parse_args()

    crops = real_crops(args.video, args.crops)
    runs = variants(random_fan_encoder_state_dict(seed=0), crops, args.compile)
    reference = runs["published, per frame"](crops)
    for name, run in runs.items():
        run(crops[:CPU_MICRO_BATCH])  # warm-up: prepared weights, kernel selection
        difference = (run(crops) - reference).abs().max() / reference.abs().max()
        print(f"{name:26s} max difference from the published forward: {difference.item():.1e}", flush=True)
    seconds: dict[tuple[str, int], list[float]] = {}
    original_threads = torch.get_num_threads()
    for repeat in range(args.repeats):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, run in runs.items():
                start = time.perf_counter()
                run(crops)
                seconds.setdefault((name, threads), []).append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    torch.set_num_threads(original_threads)

    print(f"{args.crops} crops of {args.video.name}, median of {args.repeats} interleaved runs (frames/s; "
          "x = speed relative to the published per-frame forward at the same thread count)")
    print(f"{'variant':26s}" + "".join(f" {f'{t} thread(s)':>22s}" for t in args.threads))
    for name in runs:
        cells = []
        for threads in args.threads:
            fps = args.crops / statistics.median(seconds[(name, threads)])
            base = args.crops / statistics.median(seconds[("published, per frame", threads)])
            cells.append(f"{fps:8.2f} fps {fps / base:6.2f}x")
        print(f"{name:26s}" + "".join(f" {cell:>22s}" for cell in cells))


if __name__ == "__main__":
    main()
