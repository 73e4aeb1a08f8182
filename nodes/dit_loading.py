"""The FlashPortrait DiT built as ComfyUI's Wan model from checkpoint files read tensor by tensor.

ComfyUI's ``load_diffusion_model_state_dict`` wants every weight in one dict before it builds the model, which for
the 14B model means the files' pages and the model's copy in memory at once. Here ComfyUI's own choices (model
detection, storage and compute dtypes, operations) are made from shapes and dtypes alone, the model is built
empty, and its weights are filled one block at a time, each block's source tensors released as soon as they are
copied. Peak host memory is the model plus one block.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..flashportrait_core.weights.reader import CheckpointReader
from ..flashportrait_core.weights.checkpoints import BASE, FLASHPORTRAIT, CheckpointError, DitLayout
from .wan_patch import attach_emotion_projections, patch_emotion_blocks


@dataclass(frozen=True)
class LoadedDit:
    model: comfy.model_patcher.ModelPatcher
    #: One line on the storage: "model weights bfloat16 (the files store bfloat16)".
    storage: str
    #: Weights of the files that ComfyUI's Wan model has no place for (ignored, as the published loader does).
    unused: list[str]


def _block_of(key: str) -> str:
    return ".".join(key.split(".")[:2]) if key.startswith("blocks.") else ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_flashportrait_model(layout: DitLayout, readers: dict[str, CheckpointReader], model_options: dict,
                              wan_name: str) -> LoadedDit:
    """ComfyUI's Wan 2.1 model with the weights ``layout`` names, read from ``readers`` ({BASE: ..., FLASHPORTRAIT:
    ...}), plus the emotion projections and the NFEB block patches. ``model_options`` as for ComfyUI's loaders
    (``dtype``, ``fp8_optimizations``, ``custom_operations``)."""
    metas = {role: reader.meta() for role, reader in readers.items()}
    meta = {key: metas[source][file_key] for key, (source, file_key) in layout.weights.items()}
    model_config = comfy.model_detection.model_config_from_unet(dict(meta), "")
    if model_config is None or type(model_config).__name__ != "WAN21_I2V":
        found = "nothing ComfyUI knows" if model_config is None else type(model_config).__name__
        raise CheckpointError(f"ComfyUI recognises {wan_name} as {found}, not Wan 2.1 image-to-video; select the "
                              f"Wan 2.1 I2V 14B model")
    # The storage dtype the user's Wan file has decides, as when ComfyUI loads that file by itself.
    stored = comfy.utils.weight_dtype({k: t for k, t in meta.items()
                                       if layout.weights[k][0] == (FLASHPORTRAIT if layout.complete else BASE)})
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    unet_dtype = model_options.get("dtype") or comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(meta),
        supported_dtypes=list(model_config.supported_inference_dtypes), weight_dtype=stored)
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device,
                                                                model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = model_options.get("custom_operations", model_config.custom_operations)
    if model_options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(meta, "").to(offload_device)  # parameters allocated, not yet written
    diffusion_model = model.diffusion_model

    loaded, unused = set(), []
    by_block: dict[str, list[str]] = {}
    for key in layout.weights:
        by_block.setdefault(_block_of(key), []).append(key)
    for keys in by_block.values():
        chunk = {key: readers[layout.weights[key][0]].read(layout.weights[key][1]) for key in keys}
        chunk = model_config.process_unet_state_dict(chunk)
        names = set(chunk)
        _, unexpected = diffusion_model.load_state_dict(chunk, strict=False)
        del chunk
        loaded |= names - set(unexpected)
        unused += unexpected
        for key in keys:
            source, file_key = layout.weights[key]
            readers[source].release([file_key])
    missing = sorted(set(diffusion_model.state_dict()) - loaded)
    if missing:
        raise CheckpointError(f"{wan_name}: ComfyUI's Wan model has weights that no file provides: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} ({len(missing)}); the files do not hold a "
                              f"Wan 2.1 I2V DiT")
    attach_emotion_projections(diffusion_model, _ProjectionsReadOnDemand(layout, readers[FLASHPORTRAIT],
                                                                         diffusion_model))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    patcher.size = 0  # the attached projections count toward the model's memory from now on
    patch_emotion_blocks(patcher)
    weight = diffusion_model.blocks[0].self_attn.q.weight.dtype
    storage = f"model weights {_dtype_name(weight)} (the {'file stores' if layout.complete else 'Wan base stores'} " \
              f"{_dtype_name(stored)})"
    if manual_cast_dtype is not None:
        storage += f", computed in {_dtype_name(manual_cast_dtype)}"
    return LoadedDit(model=patcher, storage=storage, unused=sorted(unused))


class _ProjectionsReadOnDemand(dict):
    """{block: {"emo_k_proj": W, "emo_v_proj": W}} read from the file when a block asks, already in the model's
    storage dtype and owned by the model (the file's tensor is released). Only the block being attached is kept."""

    def __init__(self, layout: DitLayout, reader: CheckpointReader, diffusion_model: torch.nn.Module):
        super().__init__()
        self._layout, self._reader, self._model = layout, reader, diffusion_model

    def __missing__(self, block: int) -> dict[str, torch.Tensor]:
        self.clear()  # the previous block's projections belong to the model now
        dtype = self._model.blocks[block].cross_attn.k.weight.dtype
        pair = {}
        for name, file_key in self._layout.emotion[block].items():
            pair[name] = self._reader.read(file_key).to(dtype=dtype, copy=True)
            self._reader.release([file_key])
        self[block] = pair
        return pair
