"""Reading and checking the published checkpoints without running any code from them."""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

_NESTING_KEYS = ("state_dict", "module", "model")
# Prefixes under which tools save a Wan DiT: ComfyUI checkpoints, diffusers-style wrappers, DDP.
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "module.", "model.")
_EMOTION_KEY = re.compile(r"^blocks\.(\d+)\.cross_attn\.(emo_k_proj|emo_v_proj)\.weight$")


class CheckpointError(ValueError):
    """A file is unreadable or is not the checkpoint the input expects."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (read with ``weights_only=True``).

    Pickles that want to build anything but tensors and plain containers are refused, so a crafted file
    cannot run code. A state dict nested under ``state_dict``/``module``/``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix.lower() in (".safetensors", ".sft"):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({error}); it may be "
                                  f"truncated: download it again") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path.name} was refused: it holds objects other than tensors, which a safe "
                              f"load does not execute ({str(error).splitlines()[0]}). Use the published file "
                              f"or convert a trusted one to safetensors") from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path.name} is not a readable torch checkpoint ({error}); it may be "
                              f"truncated: download it again") from error
    return unwrap_state_dict(loaded, path.name)


def unwrap_state_dict(loaded: object, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint as saved: flat, nested under ``state_dict``/``module``/``model``, or with
    every key under a ``module.`` prefix (saved from a DataParallel wrapper)."""
    while isinstance(loaded, dict):
        nested = next((loaded[k] for k in _NESTING_KEYS if isinstance(loaded.get(k), dict)), None)
        if nested is None or any(torch.is_tensor(v) for v in loaded.values()):
            break
        loaded = nested
    if not isinstance(loaded, dict) or not any(torch.is_tensor(v) for v in loaded.values()):
        raise CheckpointError(f"{name} holds no tensors; it is not a model checkpoint")
    tensors = {k: v for k, v in loaded.items() if torch.is_tensor(v)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def strip_dit_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare Wan DiT key names (``blocks.0.self_attn.q.weight``), whatever prefix the file used."""
    for prefix in _DIT_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def split_emotion_projections(state_dict: dict[str, torch.Tensor]
                              ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Separate ``blocks.{i}.cross_attn.emo_{k,v}_proj.weight`` from the Wan weights.

    Returns (Wan weights, {block index: {"emo_k_proj": W_k, "emo_v_proj": W_v}}).
    """
    wan: dict[str, torch.Tensor] = {}
    emotion: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _EMOTION_KEY.match(key)
        if match:
            emotion.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            wan[key] = value
    return wan, emotion


def describe_dit(state_dict: dict[str, torch.Tensor]) -> dict[str, int | bool]:
    """Architecture read from tensor shapes: width, depth, FFN width, input channels, image conditioning."""
    if "head.modulation" not in state_dict or "blocks.0.self_attn.q.weight" not in state_dict:
        raise CheckpointError("not a Wan DiT: keys 'head.modulation' and 'blocks.0.self_attn.q.weight' are "
                              "missing")
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    return {
        "dim": state_dict["head.modulation"].shape[-1],
        "num_blocks": max(blocks) + 1,
        "ffn_dim": state_dict["blocks.0.ffn.0.weight"].shape[0] if "blocks.0.ffn.0.weight" in state_dict else -1,
        "in_dim": state_dict["patch_embedding.weight"].shape[1] if "patch_embedding.weight" in state_dict else -1,
        "image_to_video": "blocks.0.cross_attn.k_img.weight" in state_dict,
    }


def merge_flashportrait_dit(wan_base: dict[str, torch.Tensor], flashportrait: dict[str, torch.Tensor],
                            wan_name: str = "Wan model", flashportrait_name: str = "FlashPortrait weights"
                            ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Lay the FlashPortrait DiT weights over a Wan 2.1 I2V model, as published (non-strict overlay).

    Returns the merged Wan state dict and the emotion projections per block. Raises ``CheckpointError``
    naming the file when either is not what its input expects.
    """
    # A base that already carries emotion projections (a merged file) gets them from the overlay instead.
    base, _ = split_emotion_projections(strip_dit_prefix(wan_base))
    try:
        base_arch = describe_dit(base)
    except CheckpointError as error:
        raise CheckpointError(f"{wan_name} is {error}. Select the Wan 2.1 I2V 14B diffusion model "
                              f"(e.g. wan2.1_i2v_720p_14B_bf16.safetensors) from models/diffusion_models") from None
    if not base_arch["image_to_video"] or base_arch["in_dim"] != 36:
        raise CheckpointError(f"{wan_name} is a Wan text-to-video (or other) model (in_dim "
                              f"{base_arch['in_dim']}, image attention {base_arch['image_to_video']}); "
                              f"FlashPortrait needs the Wan 2.1 image-to-video model (in_dim 36)")
    overlay, emotion = split_emotion_projections(strip_dit_prefix(flashportrait))
    if not emotion:
        raise CheckpointError(f"{flashportrait_name} hold no 'blocks.N.cross_attn.emo_k_proj.weight' keys: not a "
                              f"FlashPortrait transformer. Select FlashPortrait's transformer.pt from "
                              f"models/flashportrait")
    if set(emotion) != set(range(base_arch["num_blocks"])) or any(len(p) != 2 for p in emotion.values()):
        raise CheckpointError(f"{flashportrait_name} have emotion projections for blocks {sorted(emotion)} but "
                              f"{wan_name} has {base_arch['num_blocks']} blocks; the files do not belong together")
    for key, value in overlay.items():
        if key in base and base[key].shape != value.shape:
            raise CheckpointError(f"{flashportrait_name} do not fit {wan_name}: '{key}' is {list(value.shape)} "
                                  f"there and {list(base[key].shape)} in the Wan model. Use the 14B I2V model")
    dim = base_arch["dim"]
    for block, pair in emotion.items():
        for name, weight in pair.items():
            if weight.ndim != 2 or weight.shape[0] != dim:
                raise CheckpointError(f"{flashportrait_name}: blocks.{block}.cross_attn.{name}.weight is "
                                      f"{list(weight.shape)}, expected [{dim}, token width]")
    merged = dict(base)
    merged.update(overlay)
    return merged, emotion
