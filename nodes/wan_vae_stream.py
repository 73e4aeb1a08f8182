"""Decoding a Wan 2.1 latent video one latent frame at a time, carrying the causal VAE's state across frames.

ComfyUI's Wan VAE already decodes frame by frame internally, keeping the last frames of every causal
convolution in a cache; it only concatenates all outputs at the end. Driving the same decoder with the same
cache, but handing each frame's pixels out as soon as they exist, gives the one-shot result without seams
while holding one latent frame's worth of pixels (4 video frames) at a time.
"""
from __future__ import annotations

from collections.abc import Iterator

import comfy.model_management
import torch
from comfy.ldm.wan.vae import WanVAE, count_conv3d


def is_wan21_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), WanVAE)


def stream_decode(vae, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield IMAGE chunks [frames, H, W, 3] in [0, 1]: 1 frame for latent frame 0, then 4 per latent frame."""
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"expected one latent video [1, 16, frames, h, w], got {list(latents.shape)}")
    model = vae.first_stage_model
    frame_shape = (1, latents.shape[1], 1, latents.shape[3], latents.shape[4])
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(
        frame_shape, vae.vae_dtype), force_full_load=vae.disable_offload)
    cache = [None] * count_conv3d(model.decoder)
    with torch.inference_mode():
        for index in range(latents.shape[2]):
            z = latents[:, :, index:index + 1].to(device=vae.device, dtype=vae.vae_dtype)
            pixels = model.decoder(model.conv2(z), feat_cache=cache, feat_idx=[0])
            yield vae.process_output(pixels.float()).to(vae.output_device)[0].movedim(0, -1)
