"""Reading and checking the published checkpoints without running any code from them."""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is an empty file (0 bytes): its download or copy did not finish; "
                              f"download it again")
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


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def preferred_checkpoint(path: str | Path) -> Path:
    """The file a loader reads for ``path``: its ``.safetensors`` twin when one sits beside it.

    A pickle ``X.pt`` (or ``.pth``/``.ckpt``/``.bin``) with ``X.safetensors`` in the same folder is read from the
    safetensors file (e.g. after ``scripts/convert_checkpoint.py``): it loads without unpickling and can be
    memory-mapped. Any other path is returned unchanged.
    """
    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        return path
    twin = path.with_suffix(".safetensors")
    return twin if twin.is_file() else path


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
    except CheckpointError:
        raise CheckpointError(f"{wan_name} is {identify_checkpoint(wan_base)}, not a Wan DiT. Select the Wan 2.1 "
                              f"I2V 14B diffusion model (e.g. wan2.1_i2v_720p_14B_bf16.safetensors) from "
                              f"models/diffusion_models") from None
    if not base_arch["image_to_video"] or base_arch["in_dim"] != 36:
        raise CheckpointError(f"{wan_name} is a Wan text-to-video (or other) model (in_dim "
                              f"{base_arch['in_dim']}, image attention {base_arch['image_to_video']}); "
                              f"FlashPortrait needs the Wan 2.1 image-to-video model (in_dim 36)")
    overlay, emotion = split_emotion_projections(strip_dit_prefix(flashportrait))
    if not emotion:
        raise CheckpointError(f"{flashportrait_name} is {identify_checkpoint(flashportrait)}, not a FlashPortrait "
                              f"transformer (no 'blocks.N.cross_attn.emo_k_proj.weight' keys). Select "
                              f"FlashPortrait's transformer.pt from models/flashportrait")
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


# What a file is, told by its keys: used to say what a wrong file in a slot actually holds.
_KINDS = (
    ("a FlashPortrait transformer", lambda keys: any(_EMOTION_KEY.match(k) for k in keys)),
    ("a LoRA", lambda keys: any(m in k for k in keys for m in ("lora_A", "lora_B", "lora_down", "lora_up",
                                                                 ".diff_b", "lora.down"))),
    ("a Wan 2.1 image-to-video DiT", lambda keys: "head.modulation" in keys and "blocks.0.cross_attn.k_img.weight" in keys),
    ("a Wan text-to-video DiT", lambda keys: "head.modulation" in keys),
    ("a Wan VAE", lambda keys: "decoder.middle.0.residual.0.gamma" in keys),
    ("the FlashPortrait portrait encoder", lambda keys: any(k.startswith("mouth_proj_model.") for k in keys)),
    ("the PD-FGC expression encoder", lambda keys: "model.conv1.weight" in keys and any(k.startswith("to_mouth.") for k in keys)),
    ("a Stable Diffusion / SDXL UNet checkpoint", lambda keys: any(k.startswith(("input_blocks.", "conv_in.")) for k in keys)),
)


def identify_checkpoint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short description of what a state dict holds, e.g. "a LoRA" or "a Wan text-to-video DiT"."""
    keys = set(strip_dit_prefix(state_dict))
    for prefix in ("model.diffusion_model.", "first_stage_model."):
        keys |= {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    return next((kind for kind, matches in _KINDS if matches(keys)), "an unrecognised checkpoint")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_to_safetensors(source: str | Path, target: str | Path | None = None) -> Path:
    """Write a checkpoint's tensors as safetensors, with the source's sha256 and kind as metadata.

    The source is read safely (``weights_only``); the written file is read back and compared tensor by
    tensor before it replaces any existing file, so a failed conversion leaves nothing half-written.
    """
    source = Path(source)
    target = Path(target) if target is not None else source.with_suffix(".safetensors")
    if target.resolve() == source.resolve():
        raise CheckpointError(f"{source.name} is already the target; choose another output name")
    tensors = {k: v.contiguous() for k, v in load_state_dict(source).items()}
    metadata = {"source_file": source.name, "source_sha256": file_sha256(source),
                "architecture": identify_checkpoint(tensors), "converted_by": "flashportrait"}
    partial = target.with_name(target.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        written = load_file(str(partial))
        if written.keys() != tensors.keys() or any(not torch.equal(written[k], tensors[k]) for k in tensors):
            raise CheckpointError(f"round trip of {source.name} to safetensors changed tensors; nothing was "
                                  f"written")
        del written
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)  # a failed write (disk full, interrupted) leaves no partial file
    return target
