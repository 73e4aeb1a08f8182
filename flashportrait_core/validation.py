"""Small checks run on node inputs before any heavy work: each names the input and says how to fix it.

Rules for inputs that are adjusted rather than refused (the adjustment is reported):
- output size: each side is rounded up to a multiple of 16 (the VAE downsamples 8x, the DiT patches 2x2);
- driving frames: trimmed to the largest 4k + 1 (the VAE packs 4 frames per latent frame, plus the first);
- a window longer than the video: one window covering the whole video is used.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

IMAGE_CHANNELS = (3, 4)  # RGB, or RGBA whose alpha is ignored


class InputError(ValueError):
    """A node input that cannot be used; the message names the input and the fix."""


class NonFiniteInputError(InputError):
    """A tensor input holds NaN or Inf values."""


class ShapeMismatchError(InputError):
    """A tensor input has the wrong layout, or two inputs that must agree do not."""


def require_finite(name: str, tensor: torch.Tensor, fix: str) -> None:
    """Refuse NaN/Inf anywhere in ``tensor``, saying how many values are bad and where they came from."""
    if tensor.is_floating_point() or tensor.is_complex():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteInputError(f"{name} holds {bad} NaN/Inf value(s) of {tensor.numel()}; {fix}")


def require_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str, fix: str) -> None:
    """Refuse a tensor with another number of dimensions than ``layout`` (e.g. "[N, H, W, C]") describes."""
    if tensor.ndim != ndim:
        raise ShapeMismatchError(f"{name} must be {layout}, got shape {list(tensor.shape)}; {fix}")


def require_image_batch(name: str, image: torch.Tensor) -> None:
    """An IMAGE input: [N, H, W, C] with N, H, W >= 1, C in 3/4, all values finite."""
    fix = "connect a ComfyUI IMAGE (e.g. from Load Image)"
    require_ndim(name, image, 4, "an IMAGE batch [N, H, W, C]", fix)
    if min(image.shape[:3]) < 1:
        raise ShapeMismatchError(f"{name} is empty (shape {list(image.shape)}); {fix}")
    if image.shape[-1] not in IMAGE_CHANNELS:
        raise ShapeMismatchError(f"{name} has {image.shape[-1]} channels (shape {list(image.shape)}); it needs "
                                 f"RGB or RGBA: convert it to RGB first")
    require_finite(name, image, "it must hold colours in [0, 1]: check the node that made it")


def require_same_length(name: str, length: int, other_name: str, other_length: int, fix: str) -> None:
    """Two per-frame inputs that must have one entry per frame each."""
    if length != other_length:
        raise ShapeMismatchError(f"{name} has {length} frame(s) but {other_name} has {other_length}; {fix}")


def require_at_least(name: str, count: int, minimum: int, unit: str, fix: str) -> None:
    if count < minimum:
        raise InputError(f"{name} has {count} {unit}, at least {minimum} needed; {fix}")


def require_same_device_and_dtype(tensors: Mapping[str, torch.Tensor], fix: str) -> None:
    """Tensors used together must sit on one device with one floating dtype."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ShapeMismatchError(f"{name} is on {tensor.device} but {first_name} is on {first.device}; {fix}")
        if tensor.dtype != first.dtype:
            raise ShapeMismatchError(f"{name} is {tensor.dtype} but {first_name} is {first.dtype}; {fix}")


def window_note(num_latent_frames: int, window_length: int) -> str | None:
    """The report line for a window longer than the video, which is clipped to it (None when it fits)."""
    if window_length <= num_latent_frames:
        return None
    return (f"window_length {window_length} is longer than the video ({num_latent_frames} latent frames): "
            f"one window of {num_latent_frames} latent frames is used")


def size_note(image_height: int, image_width: int, max_side: int, height: int, width: int) -> str | None:
    """The report line for an output size that rounding to multiples of 16 moved off ``max_side`` scaling."""
    scale = max_side / max(image_height, image_width)
    exact = (int(image_height * scale), int(image_width * scale))
    if exact == (height, width):
        return None
    return (f"output {width}x{height}: the reference {image_width}x{image_height} scaled to max_side {max_side} "
            f"is {exact[1]}x{exact[0]}, each side rounded up to a multiple of 16")


def trim_note(num_frames: int, used_frames: int) -> str | None:
    """The report line for driving frames trimmed to 4k + 1."""
    if used_frames == num_frames:
        return None
    return (f"{num_frames} driving frames trimmed to {used_frames} (4k + 1, as the Wan VAE packs 4 frames per "
            f"latent frame plus the first)")


def check_sampler_inputs(reference_image: torch.Tensor, emotion_tokens: torch.Tensor,
                         positive: torch.Tensor, negative: torch.Tensor,
                         clip_vision_states: torch.Tensor | None) -> None:
    """Everything the sampler reads, checked before the reference is encoded or a window is sampled."""
    require_image_batch("reference_image", reference_image)
    require_ndim("emotion (emotion tokens)", emotion_tokens, 3, "[latent frames, tokens, width]",
                 "connect FlashPortrait Emotion Conditioning")
    require_at_least("emotion", emotion_tokens.shape[0], 1, "latent frames",
                     "the driving expressions need at least one frame")
    require_finite("emotion (emotion tokens)", emotion_tokens,
                   "the expression features or the portrait encoder produced them: re-run extraction and check "
                   "the portrait encoder file")
    for name, context in (("positive", positive), ("negative", negative)):
        require_ndim(f"{name} conditioning", context, 3, "[batch, tokens, width]",
                     "connect an encoded prompt (CLIP Text Encode or FlashPortrait Load Conditioning)")
        require_finite(f"{name} conditioning", context, "encode the prompt again")
    if positive.shape[-1] != negative.shape[-1]:
        raise ShapeMismatchError(f"positive conditioning is {positive.shape[-1]} wide but negative is "
                                 f"{negative.shape[-1]}; encode both prompts with the same text encoder (umT5)")
    if clip_vision_states is not None:
        require_finite("clip_vision_output", clip_vision_states, "run CLIP Vision Encode on the reference again")


def check_expression_features(features: torch.Tensor, found: torch.Tensor | None, feature_dim: int) -> None:
    """Driving expression features [frames, feature_dim], finite, with one face flag per frame."""
    fix = "connect FlashPortrait Extract Expressions (or Load Expressions)"
    require_ndim("expressions.features", features, 2, f"[frames, {feature_dim}]", fix)
    require_at_least("expressions", features.shape[0], 1, "frames", "use a driving video with a visible face")
    if features.shape[1] != feature_dim:
        raise ShapeMismatchError(f"expressions.features has {features.shape[1]} values per frame but the portrait "
                                 f"encoder takes {feature_dim}; extract them with the PD-FGC expression encoder "
                                 f"(pd_fpg.pth)")
    if found is not None:
        require_same_length("expressions.features", features.shape[0], "expressions.found", found.shape[0],
                            "the expressions were edited or merged inconsistently: extract them again")
    require_finite("expressions.features", features, "extract the expressions again (the driving video may be "
                                                     "damaged)")
