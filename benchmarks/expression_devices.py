"""The PD-FGC encoder on a GPU: how far its features move from exact, and how its speed grows with batch size.

Aligned crops of a real driving video (MediaPipe points, the pack's alignment) go through the encoder in several
numeric settings; each result is compared with the encoder run in float64 on the CPU (the exact function up to
float64 rounding), as the largest difference relative to the largest feature and as the relative norm:

- the CPU forward as shipped (float32),
- CUDA float32 with TF32 convolutions and matrix products (cuDNN's default, which the pack turns off),
- CUDA float32 with TF32 off (as shipped),
- CUDA bfloat16 weights and crops.

Then frames per second of the encoder alone on the GPU for each setting and batch size (after warm-up), and
end to end (`extract_expression_features_from_video`, chunks of 16 and 64) with the encoder on the GPU against
the encoder on the CPU.

    python benchmarks/expression_devices.py --video path/to/driving.mp4          # needs a CUDA device
    .venv/bin/python benchmarks/expression_devices.py --device cpu --crops 4     # the comparison alone, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flashportrait_core.weights.checkpoints import load_state_dict  # noqa: E402
from flashportrait_core.expression import (extract_expression_features_from_video, load_fan_encoder,  # noqa: E402
                                           random_fan_encoder_state_dict)
from flashportrait_core.expression import extract as extract_module  # noqa: E402
from flashportrait_core.expression import pdfgc  # noqa: E402
from flashportrait_core.expression.alignment import similarity_to_template  # noqa: E402
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend  # noqa: E402
from flashportrait_core.expression.pdfgc import expression_features  # noqa: E402
from flashportrait_core.expression.video import iter_video_chunks  # noqa: E402

DEFAULT_VIDEO = REPO_ROOT / "../shared/data/driving/lp_d3.mp4"


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 for cuDNN convolutions and cuBLAS matrix products, restored afterwards.

    `expression_features` turns TF32 off around the encoder (`pdfgc.full_float32`); while TF32 is allowed here
    that guard is lifted, to measure what it prevents.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, pdfgc.full_float32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    if allowed:
        pdfgc.full_float32 = contextlib.nullcontext
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, pdfgc.full_float32 = saved


def difference(features: torch.Tensor, exact: torch.Tensor) -> str:
    delta = features.double().cpu() - exact
    return (f"largest {float(delta.abs().max() / exact.abs().max()):.1e} of the largest feature, "
            f"relative norm {float(delta.norm() / exact.norm()):.1e}")


def aligned_crops(video: Path, frames: int | None, batch_size: int) -> torch.Tensor:
    chunks = [torch.from_numpy(c) for c in iter_video_chunks(video, batch_size, frames)]
    track = extract_module.track_faces(chunks, MediaPipeFaceBackend())
    stable = extract_module.stabilize_track(track, 30.0, 0.5)
    transforms = similarity_to_template(torch.from_numpy(stable.points).to(torch.float64))
    return torch.cat([extract_module.align_chunk(c, t, torch.device("cpu"))
                      for c, t in zip(chunks, transforms.split(batch_size))])


def encoder_fps(encoder: torch.nn.Module, crops: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Frames/s of `expression_features` over all crops in batches of `batch_size` (median of `repeats`)."""
    batches = crops.split(batch_size)
    expression_features(encoder, batches[0])  # warm-up: cuDNN algorithm choice for this shape
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            expression_features(encoder, batch)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return crops.shape[0] / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--frames", type=int, default=0, help="first N frames of the video for timing (0: all)")
    parser.add_argument("--crops", type=int, default=64, help="crops compared with the float64 encoder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", help="pd_fpg.pth (default: random weights at the real size)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for the CPU comparison alone")
    args = parser.parse_args()

    state = load_state_dict(args.weights) if args.weights else random_fan_encoder_state_dict(seed=0)
    crops = aligned_crops(args.video, args.frames or None, 16)
    sample = crops[:args.crops]
    exact_encoder = load_fan_encoder(state).double()
    exact = torch.cat([expression_features(exact_encoder, part) for part in sample.double().split(8)])
    print(f"{args.video.name}: {crops.shape[0]} aligned crops; differences from the float64 encoder on {len(sample)}")
    shipped = expression_features(load_fan_encoder(state), sample)
    print(f"  {'cpu, float32 (as shipped):':33s} {difference(shipped, exact)}")
    if args.device == "cpu":
        return

    gpu = load_fan_encoder(state).to(args.device)
    gpu_bf16 = load_fan_encoder(state).to(args.device, torch.bfloat16)
    settings = {"float32, TF32 on": (gpu, True), "float32, TF32 off": (gpu, False), "bfloat16": (gpu_bf16, False)}
    for name, (encoder, allowed) in settings.items():
        with tf32(allowed):
            features = expression_features(encoder, sample.to(args.device))
        print(f"  {args.device + ', ' + name + ':':33s} {difference(features, exact)}")

    print(f"encoder alone on {torch.cuda.get_device_name()}, frames/s (median of {args.repeats}), "
          f"{crops.shape[0]} crops")
    print(f"  {'batch size':>10s} " + " ".join(f"{name:>18s}" for name in settings))
    on_device = crops.to(args.device)
    for batch_size in args.batch_sizes:
        row = []
        for encoder, allowed in settings.values():
            with tf32(allowed):
                row.append(encoder_fps(encoder, on_device, batch_size, args.repeats))
        print(f"  {batch_size:10d} " + " ".join(f"{fps:18.1f}" for fps in row))

    backend = MediaPipeFaceBackend()
    for batch_size in (16, 64):
        for name, encoder in (("GPU encoder", gpu), ("CPU encoder", load_fan_encoder(state))):
            start = time.perf_counter()
            result = extract_expression_features_from_video(args.video, encoder, backend, batch_size=batch_size,
                                                            max_frames=args.frames or None, target_fps=0)
            seconds = time.perf_counter() - start
            print(f"end to end, chunks of {batch_size}, {name}: {result.features.shape[0] / seconds:.1f} frames/s")


if __name__ == "__main__":
    main()
