"""Computed memory of one sampler window of the published model (Wan 2.1 I2V 14B + FlashPortrait) by resolution.

Nothing runs: the figures follow from the architecture and ComfyUI's Wan block (``comfy/ldm/wan/model.py``), for
inference in bf16 with a memory-efficient attention (no tokens x tokens matrix). A window of F latent frames at
H x W pixels has N = F * (H / 16) * (W / 16) tokens (VAE 8x, patch 2x2). The largest live set inside a block is
the feed-forward: the block input and its modulated copy [N, dim], the hidden layer and its GELU [N, ffn_dim]
each, i.e. N * (2 * dim + 2 * ffn_dim) values; self-attention holds about N * 7 * dim (input, modulated input,
q, k, v, rotated q and k). The guidance passes of a step run one after another, so their number does not raise
the peak. ComfyUI's estimate of decoding one latent frame whole is printed beside it (``memory_used_decode`` of
the Wan 2.1 VAE in bf16; above the free memory the decoder uses 256 px tiles, about 0.9 GB each).

    .venv/bin/python benchmarks/window_memory.py [--frames 51] [--sides 720 1024 2048]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_full_size import WAN_14B, dit_shapes  # noqa: E402

DIM, FFN_DIM = WAN_14B["dim"], WAN_14B["ffn_dim"]
BYTES = 2  # bf16
GB = 1e9


def parameter_counts() -> tuple[int, int]:
    """Parameters of the Wan 2.1 I2V 14B DiT and of FlashPortrait's emotion projections, from the published shapes."""
    shapes = dit_shapes(**WAN_14B)
    emotion = sum(math.prod(s) for k, s in shapes.items() if ".emo_" in k)
    return sum(math.prod(s) for s in shapes.values()) - emotion, emotion


def window_figures(side: int, frames: int) -> dict[str, float]:
    tokens = frames * (side // 16) ** 2
    ffn = tokens * (2 * DIM + 2 * FFN_DIM) * BYTES
    attention = tokens * 7 * DIM * BYTES
    latents = 16 * frames * (side // 8) ** 2 * 4  # the window's latents in float32
    decode_frame = 7000 * (side // 8) ** 2 * 64 * BYTES
    return {"tokens": tokens, "activations_gb": max(ffn, attention) / GB, "latents_mb": latents / 1e6,
            "decode_frame_gb": decode_frame / GB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=51, help="latent frames per window (published: 51)")
    parser.add_argument("--sides", type=int, nargs="+", default=[720, 1024, 2048])
    args = parser.parse_args()
    wan, emotion = parameter_counts()
    print(f"weights (not per window): Wan DiT {wan / 1e9:.2f} B parameters + emotion projections {emotion / 1e9:.2f} B "
          f"= {(wan + emotion) * 2 / GB:.1f} GB in bf16, {(wan + emotion) / GB:.1f} GB in fp8")
    print("| size | tokens per window | peak activations per DiT pass | window latents | decode, one latent "
          "frame whole (ComfyUI's estimate) |")
    print("|---|---|---|---|---|")
    for side in args.sides:
        f = window_figures(side, args.frames)
        print(f"| {side}x{side}, {args.frames} latent frames | {f['tokens']:,} | {f['activations_gb']:.1f} GB | "
              f"{f['latents_mb']:.0f} MB | {f['decode_frame_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
