"""Decoding a Wan 2.1 latent video one latent frame at a time, carrying the causal VAE's state across frames.

ComfyUI's Wan VAE already decodes frame by frame internally, keeping the last frames of every causal
convolution in a cache; it only concatenates all outputs at the end. Driving the same decoder with the same
cache, but handing each frame's pixels out as soon as they exist, gives the one-shot result without seams
while holding one latent frame's worth of pixels (4 video frames) at a time.

When a frame does not fit in memory, decoding goes over to ComfyUI's own tiled decoding (what its VAE falls
back to on out-of-memory: 256 px tiles overlapping by 64 px, blended by ``comfy.utils.tiled_scale_multidim``),
still one latent frame at a time: every tile keeps its own causal cache, so the frames equal
``vae.decode_tiled`` of the whole video. The caches of all tiles together are about as large as a whole
frame's, so on a GPU they wait in host memory while other tiles decode: the GPU holds one tile's work. Every
decoder layer checks ComfyUI's interrupt flag, so a cancel lands within one layer's time, not one latent
frame's.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import comfy.model_management
import comfy.utils
import torch
from comfy.ldm.wan.vae import WanVAE, count_conv3d

# ComfyUI's fallback in VAE.decode: tiles of 256 px (in latent pixels: 256 / 8) overlapping by a quarter.
TILE = 256 // 8
TILE_OVERLAP = TILE // 4


def is_wan21_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), WanVAE)


def frame_memory(vae, latents: torch.Tensor) -> int:
    """ComfyUI's estimate (bytes) of decoding one latent frame of ``latents`` whole."""
    frame_shape = (1, latents.shape[1], 1, latents.shape[3], latents.shape[4])
    return int(vae.memory_used_decode(frame_shape, vae.vae_dtype))


def _moved(entry, device: torch.device):
    """A causal-cache entry (a tensor, None, or the decoder's 'Rep' marker) on ``device``."""
    return entry.to(device) if isinstance(entry, torch.Tensor) else entry


def _check_interrupt(module: torch.nn.Module, args: tuple) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


class StreamDecoder:
    """Yields IMAGE chunks [frames, H, W, 3] in [0, 1]: 1 frame for latent frame 0, then 4 per latent frame.

    ``tiled``: None decodes whole frames and goes over to tiled decoding when a frame does not fit (an
    out-of-memory error, or on the CPU, where running out of memory raises nothing, ComfyUI's memory estimate
    above the free memory); True or False forces one way. ``tiled_from`` is the latent frame where tiled
    decoding began (None while every frame was decoded whole).
    """

    def __init__(self, vae, latents: torch.Tensor, tiled: bool | None = None, tile: int = TILE,
                 overlap: int = TILE_OVERLAP) -> None:
        if latents.ndim != 5 or latents.shape[0] != 1:
            raise ValueError(f"expected one latent video [1, 16, frames, h, w], got {list(latents.shape)}")
        if not 0 <= overlap < tile:
            raise ValueError(f"tile overlap must be in [0, tile), got tile {tile} and overlap {overlap}")
        self.vae, self.latents = vae, latents
        self.model = vae.first_stage_model
        self.tiled, self.tile, self.overlap = tiled, tile, overlap
        self.tiled_from: int | None = None

    def _frame_fits(self) -> bool:
        device = torch.device(self.vae.device)
        if device.type != "cpu":
            return True  # tried, and caught as an out-of-memory error if it does not fit
        return frame_memory(self.vae, self.latents) <= comfy.model_management.get_free_memory(device)

    def _latent_frame(self, index: int) -> torch.Tensor:
        return self.latents[:, :, index:index + 1].to(device=self.vae.device, dtype=self.vae.vae_dtype)

    def _to_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.process_output(pixels.float()).to(self.vae.output_device)[0].movedim(0, -1)

    def _whole_frames(self) -> Iterator[torch.Tensor]:
        cache = [None] * count_conv3d(self.model.decoder)
        for index in range(self.latents.shape[2]):
            self.current = index
            yield self._to_image(self.model.decoder(self.model.conv2(self._latent_frame(index)),
                                                    feat_cache=cache, feat_idx=[0]))

    def _tiled_frames(self) -> Iterator[torch.Tensor]:
        caches: list[list] = []  # one causal cache per tile, in the tiler's (fixed) order of tiles
        ratio = self.vae.upscale_ratio
        device = torch.device(self.vae.device)
        parked = torch.device("cpu") if device.type != "cpu" else None  # where idle tiles' caches wait
        for index in range(self.latents.shape[2]):
            calls = 0

            def decode_tile(tile: torch.Tensor) -> torch.Tensor:
                nonlocal calls
                if calls == len(caches):
                    caches.append([None] * count_conv3d(self.model.decoder))
                cache, calls = caches[calls], calls + 1
                if parked is not None:
                    cache[:] = [_moved(entry, device) for entry in cache]
                pixels = self.model.decoder(self.model.conv2(tile), feat_cache=cache, feat_idx=[0]).float()
                if parked is not None:
                    cache[:] = [_moved(entry, parked) for entry in cache]
                return pixels

            frames_out = 1 if index == 0 else 4
            pixels = comfy.utils.tiled_scale_multidim(
                self._latent_frame(index), decode_tile, tile=(1, self.tile, self.tile),
                overlap=(0, self.overlap, self.overlap), upscale_amount=(frames_out, ratio[1], ratio[2]),
                out_channels=self.vae.output_channels, output_device=self.vae.output_device)
            if calls != len(caches):
                raise RuntimeError(f"tiled decoding visited {calls} tiles in latent frame {index}, "
                                   f"{len(caches)} before")
            yield index, self._to_image(pixels)

    def __iter__(self) -> Iterator[torch.Tensor]:
        vae = self.vae
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=frame_memory(vae, self.latents),
                                               force_full_load=vae.disable_offload)
        hooks = [module.register_forward_pre_hook(_check_interrupt) for module in self.model.decoder.modules()]
        try:
            with torch.inference_mode():
                yield from self._frames()
        finally:
            for hook in hooks:
                hook.remove()

    def _frames(self) -> Iterator[torch.Tensor]:
        tiled = self.tiled if self.tiled is not None else not self._frame_fits()
        done = 0
        if not tiled:
            self.current = 0
            out_of_memory = False
            try:
                for frames in self._whole_frames():
                    yield frames
                    done += 1
                return
            except comfy.model_management.OOM_EXCEPTION:
                if self.tiled is False:
                    raise
                out_of_memory = True  # handled below, once the exception no longer holds the frame's tensors
            if out_of_memory:
                logging.warning("FlashPortrait decode: latent frame %d does not fit in memory, going on with "
                                "ComfyUI's tiled decoding", self.current)
                comfy.model_management.soft_empty_cache()
        self.tiled_from = done
        # Tiles carry their own caches from frame 0 on; frames already handed out are decoded again, not yielded.
        for index, frames in self._tiled_frames():
            if index >= done:
                yield frames


def stream_decode(vae, latents: torch.Tensor, tiled: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield IMAGE chunks [frames, H, W, 3] in [0, 1]: 1 frame for latent frame 0, then 4 per latent frame."""
    return iter(StreamDecoder(vae, latents, tiled))
