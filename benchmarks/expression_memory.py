"""Peak memory of expression extraction from a video file: a 10-second and a 60-second driving video.

The long video is made by concatenating real driving clips (25 fps, 512x512) until it lasts 60 s; the short
one is its first 10 s. Each extraction runs in a fresh process; its peak resident memory (ru_maxrss) is
printed. Streaming keeps the two within a few percent: frames are decoded in chunks, never all held.

    .venv/bin/python benchmarks/expression_memory.py                  # real-size PD-FGC (random weights)
    .venv/bin/python benchmarks/expression_memory.py --weights /path/to/pd_fpg.pth
    .venv/bin/python benchmarks/expression_memory.py --encoder small  # a small stand-in encoder: minutes less

`--worker VIDEO` runs one extraction and prints one JSON line (used by the test suite with `--encoder small`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from driving_clips import concatenate_clips

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIPS = ("lp_d0.mp4", "lp_d11.mp4", "lp_d12.mp4")  # all 512x512 at 25 fps
FPS = 25


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _small_encoder():
    import torch
    from torch import nn

    class SmallEncoder(nn.Module):
        """The FanEncoder's interface at a tiny cost: memory of everything around the encoder is measured."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
            self.head = nn.Linear(8, 554)

        def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.head(self.conv(crops).mean(dim=(2, 3)))
            return {"headpose": out[:, :6], "eye": out[:, 6:12], "emo": out[:, 12:42], "mouth": out[:, 42:]}

    return SmallEncoder().eval()


def worker(video: str, max_frames: int | None, encoder_kind: str, weights: str | None, batch_size: int) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    from flashportrait_core.weights.checkpoints import load_state_dict
    from flashportrait_core.expression import (extract_expression_features_from_video, load_fan_encoder,
                                               random_fan_encoder_state_dict)
    from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

    if encoder_kind == "small":
        encoder = _small_encoder()
    else:
        state = load_state_dict(weights) if weights else random_fan_encoder_state_dict(seed=0)
        encoder = load_fan_encoder(state)
    before = _rss_mb()
    start = time.perf_counter()
    with MediaPipeFaceBackend() as backend:
        result = extract_expression_features_from_video(video, encoder, backend, batch_size=batch_size,
                                                        smoothing=0.5, max_frames=max_frames, target_fps=0)
    seconds = time.perf_counter() - start
    return {"frames": int(result.features.shape[0]), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "seconds": round(seconds, 1),
            "frames_per_second": round(result.features.shape[0] / seconds, 2)}


def make_long_video(path: Path, seconds: float) -> int:
    """Concatenate the real clips (re-encoded, H.264, 512x512) until `seconds` long; returns the frame count."""
    return concatenate_clips(path, CLIPS, int(round(seconds * FPS)), 512, FPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="VIDEO", help="run one extraction and print a JSON line")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--encoder", choices=("pdfgc", "small"), default="pdfgc")
    parser.add_argument("--weights", help="pd_fpg.pth (default: random weights at the real size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short", type=float, default=10.0, help="short video length (s)")
    parser.add_argument("--long", type=float, default=60.0, help="long video length (s)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.max_frames, args.encoder, args.weights, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "long.mp4"
        total = make_long_video(video, args.long)
        print(f"driving video: {total} frames ({total / FPS:.0f} s) from {', '.join(CLIPS)}; encoder {args.encoder}")
        results = {}
        for frames in (int(round(args.short * FPS)), total):
            command = [sys.executable, __file__, "--worker", str(video), "--max-frames", str(frames),
                       "--encoder", args.encoder, "--batch-size", str(args.batch_size)]
            if args.weights:
                command += ["--weights", args.weights]
            completed = subprocess.run(command, capture_output=True, text=True, check=True)
            results[frames] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"{frames / FPS:5.0f} s ({frames} frames): {results[frames]}", flush=True)
        short, long = (results[frames]["peak_rss_mb"] for frames in sorted(results))
        print(f"peak RSS: {short:.0f} MB (short) vs {long:.0f} MB (long): {100 * (long / short - 1):+.1f}%")


if __name__ == "__main__":
    main()
