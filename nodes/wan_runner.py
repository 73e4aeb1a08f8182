"""Helpers around ComfyUI's Wan model for FlashPortrait sampling: sizing, the reference condition, memory."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import comfy.model_management
import comfy.utils
import torch

from ..flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from ..flashportrait_core.sampling.windows import WindowPlan

SIDE_MULTIPLE = 16  # the VAE halves 8x and the DiT patches 2x2


def generation_size(image_height: int, image_width: int, max_side: int) -> tuple[int, int]:
    """Published sizing: scale the longest side to ``max_side``, round each side up to a multiple of 16."""
    scale = max_side / max(image_height, image_width)
    height, width = int(image_height * scale), int(image_width * scale)
    round_up = lambda side: max(SIDE_MULTIPLE, math.ceil(side / SIDE_MULTIPLE) * SIDE_MULTIPLE)  # noqa: E731
    return round_up(height), round_up(width)


def reference_condition(vae, reference: torch.Tensor, height: int, width: int, latent_frames: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-video condition of one window: the reference at frame 0, mid-grey (zero in [-1, 1]) after it.

    Returns the VAE latent [1, 16, latent_frames, h, w] and the known-frame mask [1, 1, latent_frames, h, w]
    (0 where known: latent frame 0), in the form ComfyUI's Wan model takes as ``concat_latent_image`` and
    ``concat_mask``.
    """
    image = comfy.utils.common_upscale(reference[:1, :, :, :3].movedim(-1, 1), width, height, "lanczos",
                                       "disabled").movedim(1, -1).clamp(0, 1)
    video_frames = (latent_frames - 1) * 4 + 1
    pixels = torch.full((video_frames, height, width, 3), 0.5, dtype=image.dtype)
    pixels[0] = image[0]
    latent = vae.encode(pixels)
    mask = torch.ones((1, 1, latent_frames, latent.shape[-2], latent.shape[-1]), dtype=latent.dtype)
    mask[:, :, 0] = 0.0
    return latent, mask


class SamplingOutOfMemory(comfy.model_management.OOM_EXCEPTION):
    """Sampling ran out of memory; the message names the settings to lower. (Still an OOM for ComfyUI, which
    then unloads its models.)"""


def out_of_memory_message(error: BaseException, plan: WindowPlan, height: int, width: int) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"FlashPortrait Sampler ran out of memory sampling {len(plan.windows)} window(s) of "
            f"{plan.window_length} latent frames at {width}x{height} ({first_line}). Lower window_length in "
            f"FlashPortrait Windows (now {plan.window_length}) or max_side in the sampler, load the model with "
            f"weight_dtype fp8_e4m3fn, or start ComfyUI with --lowvram so weights are offloaded; an acceleration "
            f"preset (ALP) shortens the run but does not lower the peak memory.")


def latent_storage_device(load_device: torch.device | str, plan: WindowPlan) -> torch.device:
    """Where the full latents live: on the host whenever the model runs elsewhere and there is more than one
    window, so the accelerator holds one window's latents at a time (the copies are small next to a DiT pass);
    otherwise on the model's device."""
    device = torch.device(load_device)
    return torch.device("cpu") if device.type != "cpu" and len(plan.windows) > 1 else device


@contextmanager
def portrait_encoder_on(device: torch.device | str, emotion: EmotionConditioning) -> Iterator[None]:
    """Keep the portrait encoder on the sampling device while the windows are sampled.

    The emotion tokens are encoded per window at every step (host memory stays flat with the video); on a GPU
    that is negligible beside a DiT pass, on the CPU it takes seconds per window visit. The encoder goes back
    where it was afterwards; when it does not fit, tokens are encoded where it is.
    """
    encoder, device = emotion.encoder, torch.device(device)
    home = next(encoder.parameters()).device if encoder is not None else device
    if encoder is None or home == device:
        yield
        return
    try:
        comfy.model_management.free_memory(
            sum(t.numel() * t.element_size() for t in encoder.state_dict().values()), device)
        encoder.to(device)
    except comfy.model_management.OOM_EXCEPTION:
        encoder.to(home)
    try:
        yield
    finally:
        encoder.to(home)
