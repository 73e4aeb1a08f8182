"""Precomputed prompt and CLIP-vision conditioning stored as one safetensors file.

A fixed prompt and a fixed reference image need the 11 GB umT5 encoder and the CLIP ViT-H model only once:
their outputs are saved here and loaded instead of the encoders on later runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_NAME = "flashportrait.conditioning"
FORMAT_VERSION = "1"
_KEYS = ("positive", "negative", "clip_vision_penultimate")


@dataclass(frozen=True)
class PrecomputedConditioning:
    positive: torch.Tensor  # [1, tokens, text_dim] prompt embeddings
    negative: torch.Tensor  # [1, tokens, text_dim] negative-prompt embeddings
    clip_vision_penultimate: torch.Tensor  # [1, 257, 1280] penultimate CLIP-vision states of the reference


def _check(name: str, tensor: torch.Tensor) -> None:
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise ValueError(f"conditioning '{name}' must have shape [1, tokens, width], got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"conditioning '{name}' contains NaN or Inf values")


def save_conditioning_file(path: str | Path, positive: torch.Tensor, negative: torch.Tensor,
                           clip_vision_penultimate: torch.Tensor) -> Path:
    tensors = {"positive": positive, "negative": negative, "clip_vision_penultimate": clip_vision_penultimate}
    for name, tensor in tensors.items():
        _check(name, tensor)
    if positive.shape[-1] != negative.shape[-1]:
        raise ValueError(f"positive and negative conditioning widths differ: {positive.shape[-1]} vs "
                         f"{negative.shape[-1]}; encode both with the same text encoder")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT_NAME, "version": FORMAT_VERSION})
    return path


def load_conditioning_file(path: str | Path) -> PrecomputedConditioning:
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read conditioning file {path}: {error}. Save one with the "
                         f"'Save Conditioning' node or choose another file") from error
    missing = [k for k in _KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path.name} is not a FlashPortrait conditioning file (missing {missing}); "
                         f"save one with the 'Save Conditioning' node")
    for name in _KEYS:
        _check(name, tensors[name])
    return PrecomputedConditioning(**{k: tensors[k] for k in _KEYS})
