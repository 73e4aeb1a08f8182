"""Frames per second of expression extraction on this machine, stage by stage, batched versus one frame at a time.

Stages: decoding (PyAV), face detection (MediaPipe, tracking), alignment (similarity + bicubic warp), the PD-FGC
encoder, and end to end (`extract_expression_features_from_video`: two decoding passes, smoothing, everything).
Batched runs use chunks of `--batch-size` frames; the per-frame loop runs the same stages one frame at a time,
as the published pipeline does. The encoder is timed as shipped (on a CPU the inference-only forward of
`pdfgc_cpu`, channels-last, micro-batches of 4 inside each chunk), as the module's own forward channels-last in
the same micro-batches, and in PyTorch's default layout (the published one) on the whole chunk. The published
per-frame loop is end to end with the default-layout module forward, one frame at a time. Every variant runs
`--repeats` times, interleaved, and the medians print.

    .venv/bin/python benchmarks/expression_speed.py                       # lp_d3.mp4, 32 frames, 3 repeats
    .venv/bin/python benchmarks/expression_speed.py --frames 64 --weights /path/to/pd_fpg.pth
    .venv/bin/python benchmarks/expression_speed.py --threads 1             # torch intra-op threads
    .venv/bin/python benchmarks/expression_speed.py --frames 0 --only "end to end" "encoder (as shipped)"
                                                                          # the whole video, some stages
    python benchmarks/expression_speed.py --device cuda --frames 0          # encoder and alignment on a GPU

Without `--weights` the encoder has random weights at the real size (same cost per frame).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flashportrait_core.weights.checkpoints import load_state_dict  # noqa: E402
from flashportrait_core.expression import (extract_expression_features_from_video, load_fan_encoder,  # noqa: E402
                                           random_fan_encoder_state_dict)
from flashportrait_core.expression import extract as extract_module  # noqa: E402
from flashportrait_core.expression.alignment import similarity_to_template  # noqa: E402
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend  # noqa: E402
from flashportrait_core.expression.pdfgc import FEATURE_DIM, expression_features  # noqa: E402
from flashportrait_core.expression.video import iter_video_chunks, probe_video  # noqa: E402

DEFAULT_VIDEO = REPO_ROOT / "../shared/data/driving/lp_d3.mp4"


def encode_default_layout(encoder: torch.nn.Module, crops: torch.Tensor) -> torch.Tensor:
    """The encoder as published: PyTorch's default (contiguous) layout, no conversion."""
    with torch.inference_mode():
        parts = encoder(crops.contiguous())
        return torch.cat([parts["headpose"], parts["eye"], parts["emo"], parts["mouth"]], dim=1)


class Bench:
    def __init__(self, video: Path, frames: int, batch_size: int, encoder: torch.nn.Module) -> None:
        self.video, self.frames, self.batch_size = video, frames, batch_size
        self.encoder = encoder  # channels-last once used
        self.device = next(encoder.parameters()).device
        self.default_layout_encoder = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
        self.backend = MediaPipeFaceBackend()
        # Inputs of the later stages, prepared once: decoded chunks, points, transforms, crops.
        self.chunks = [torch.from_numpy(c) for c in iter_video_chunks(video, batch_size, frames)]
        track = extract_module.track_faces(self.chunks, self.backend)
        stable = extract_module.stabilize_track(track, 30.0, 0.5)
        self.transforms = similarity_to_template(torch.from_numpy(stable.points).to(torch.float64))
        self.crops = torch.cat([extract_module.align_chunk(c, t, self.device)
                                for c, t in zip(self.chunks, self.transforms.split(batch_size))])

    def _sizes(self, per_frame: bool) -> int:
        return 1 if per_frame else self.batch_size

    def decode(self, per_frame: bool) -> None:
        for _ in iter_video_chunks(self.video, self._sizes(per_frame), self.frames):
            pass

    def detect(self, per_frame: bool) -> None:
        frames = torch.cat(self.chunks).numpy()
        step = self._sizes(per_frame)
        for start in range(0, self.frames, step):
            self.backend.detect(frames[start:start + step], reset=start == 0)

    def align(self, per_frame: bool) -> None:
        frames = torch.cat(self.chunks)
        step = self._sizes(per_frame)
        for start in range(0, self.frames, step):
            extract_module.align_chunk(frames[start:start + step], self.transforms[start:start + step],
                                       self.device)

    def encoder_as_shipped(self, per_frame: bool) -> None:
        for crops in self.crops.split(self._sizes(per_frame)):
            expression_features(self.encoder, crops)

    def encoder_module_forward(self, per_frame: bool) -> None:
        for crops in self.crops.split(self._sizes(per_frame)):
            expression_features(self.encoder, crops, cpu_forward=False)

    def encoder_default_layout(self, per_frame: bool) -> None:
        for crops in self.crops.split(self._sizes(per_frame)):
            encode_default_layout(self.default_layout_encoder, crops)

    def end_to_end(self, per_frame: bool) -> None:
        result = extract_expression_features_from_video(self.video, self.encoder, self.backend,
                                                        batch_size=self._sizes(per_frame), smoothing=0.5,
                                                        max_frames=self.frames, target_fps=0)
        assert result.features.shape == (self.frames, FEATURE_DIM)

    def end_to_end_default_layout(self, per_frame: bool) -> None:
        """End to end with the encoder in the published layout (the published pipeline's per-frame loop)."""
        original = extract_module.expression_features
        extract_module.expression_features = lambda encoder, crops: encode_default_layout(
            self.default_layout_encoder, crops)
        try:
            self.end_to_end(per_frame)
        finally:
            extract_module.expression_features = original


# MediaPipe's worker threads keep spinning for a moment after detection and slow whatever runs next on a
# 2-core machine (measured: a 7 ms warp took 120 ms right after detection). Extraction meets this once, between
# its two passes; here every stage is timed after a pause so that no stage pays for the previous one.
SETTLE_SECONDS = 1.0


def timed(function: Callable[[], None]) -> float:
    time.sleep(SETTLE_SECONDS)
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: count it all
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=32, help="first N frames of the video (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", help="pd_fpg.pth (default: random weights at the real size)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="time only these stages (names as printed)")
    parser.add_argument("--device", default="cpu", help="where the encoder and the alignment run (cpu, cuda)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.frames:
        args.frames = probe_video(args.video).frame_count

    state = load_state_dict(args.weights) if args.weights else random_fan_encoder_state_dict(seed=0)
    bench = Bench(args.video, args.frames, args.batch_size, load_fan_encoder(state).to(args.device))
    stages = {
        "decoding": bench.decode,
        "detection": bench.detect,
        "alignment": bench.align,
        "encoder (as shipped)": bench.encoder_as_shipped,
        "encoder (module forward, channels-last)": bench.encoder_module_forward,
        "encoder (default layout)": bench.encoder_default_layout,
        "end to end": bench.end_to_end,
        "end to end, default-layout encoder": bench.end_to_end_default_layout,
    }
    unknown = sorted(set(args.only or ()) - set(stages))
    if unknown:
        sys.exit(f"unknown stage(s) {unknown}; stages: {list(stages)}")
    if args.only:
        stages = {name: stage for name, stage in stages.items() if name in args.only}
    expression_features(bench.encoder, bench.crops[:2])  # warm-up: prepared weights, kernel selection
    expression_features(bench.encoder, bench.crops[:2], cpu_forward=False)
    encode_default_layout(bench.default_layout_encoder, bench.crops[:2])
    seconds: dict[tuple[str, bool], list[float]] = {}
    for repeat in range(args.repeats):
        for name, stage in stages.items():
            for per_frame in (False, True):
                seconds.setdefault((name, per_frame), []).append(timed(lambda: stage(per_frame)))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    fps = {key: args.frames / statistics.median(values) for key, values in seconds.items()}
    print(f"{args.video.name}, {args.frames} frames, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.device}, median of {args.repeats} runs (frames/s)")
    print(f"{'stage':42s} {'batched':>9s} {'per frame':>10s} {'ratio':>7s}")
    for name in stages:
        batched, single = fps[(name, False)], fps[(name, True)]
        print(f"{name:42s} {batched:9.2f} {single:10.2f} {batched / single:6.2f}x")
    encoder = fps.get(("encoder (as shipped)", False))
    end_to_end = fps.get(("end to end", False))
    published = fps.get(("end to end, default-layout encoder", True))
    if end_to_end and encoder:
        print(f"end to end takes {encoder / end_to_end:.2f}x the batched encoder's time (target <= 1.3x)")
    if end_to_end and published:
        print(f"end to end is {end_to_end / published:.2f}x the per-frame loop with the published layout, "
              f"{end_to_end / fps[('end to end', True)]:.2f}x the per-frame loop as shipped (target >= 2x)")
    if encoder and all(("encoder (" + kind + ")", False) in fps
                       for kind in ("default layout", "module forward, channels-last")):
        print(f"encoder as shipped: {encoder / fps[('encoder (default layout)', False)]:.2f}x the default layout "
              f"on whole chunks, {encoder / fps[('encoder (default layout)', True)]:.2f}x it one frame at a time, "
              f"{encoder / fps[('encoder (module forward, channels-last)', False)]:.2f}x the module forward "
              "channels-last in the same micro-batches")


if __name__ == "__main__":
    main()
