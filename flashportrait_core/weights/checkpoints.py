"""Reading and checking the published checkpoints without running any code from them."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from .reader import CheckpointError, open_checkpoint, unwrap_state_dict

__all__ = ["CheckpointError", "unwrap_state_dict"]  # re-exported: loaders and tests import them from here

# Prefixes under which tools save a Wan DiT: ComfyUI checkpoints, diffusers-style wrappers, DDP.
_DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "module.", "model.")
_EMOTION_KEY = re.compile(r"^blocks\.(\d+)\.cross_attn\.(emo_k_proj|emo_v_proj)\.weight$")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file or a torch pickle (read with ``weights_only=True``), for small files.

    Pickles that want to build anything but tensors and plain containers are refused, so a crafted file
    cannot run code. A state dict nested under ``state_dict``/``module``/``model`` is unwrapped. Large models are
    read tensor by tensor instead (``reader.open_checkpoint``).
    """
    with open_checkpoint(path) as reader:
        return {key: reader.read(key) for key in reader.keys()}


def dit_key_prefix(keys: Iterable[str]) -> str:
    """The prefix a file puts before bare Wan DiT key names (``model.diffusion_model.``, ...; "" for none)."""
    keys = list(keys)
    for prefix in _DIT_PREFIXES:
        if any(k.startswith(prefix + "blocks.") for k in keys):
            return prefix
    return ""


def strip_dit_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare Wan DiT key names (``blocks.0.self_attn.q.weight``), whatever prefix the file used."""
    prefix = dit_key_prefix(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


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


# Every weight of a Wan 2.1 image-to-video DiT (the official checkpoints' names; ComfyUI's WanModel has the same).
WAN_I2V_TOP_KEYS = tuple(
    f"{layer}.{kind}"
    for layer in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                  "time_projection.1", "head.head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3",
                  "img_emb.proj.4")
    for kind in ("weight", "bias")) + ("head.modulation",)
WAN_I2V_BLOCK_KEYS = (
    *(f"self_attn.{p}.{kind}" for p in "qkvo" for kind in ("weight", "bias")),
    "self_attn.norm_q.weight", "self_attn.norm_k.weight",
    *(f"cross_attn.{p}.{kind}" for p in ("q", "k", "v", "o", "k_img", "v_img") for kind in ("weight", "bias")),
    "cross_attn.norm_q.weight", "cross_attn.norm_k.weight", "cross_attn.norm_k_img.weight",
    "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias", "modulation",
)
# Keys and metadata of ComfyUI's scaled / mixed-precision fp8 files: weights only mean something with their scales.
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
_QUANTIZATION_METADATA = "_quantization_metadata"

BASE, FLASHPORTRAIT = "wan", "flashportrait"  # where a weight of the merged DiT is read from


def wan_i2v_keys(num_blocks: int) -> list[str]:
    """Every weight name of a Wan 2.1 I2V DiT with ``num_blocks`` blocks (no emotion projections)."""
    return [*WAN_I2V_TOP_KEYS, *(f"blocks.{i}.{k}" for i in range(num_blocks) for k in WAN_I2V_BLOCK_KEYS)]


def missing_wan_i2v_keys(keys: Iterable[str], num_blocks: int) -> list[str]:
    """The weights of a Wan 2.1 I2V DiT with ``num_blocks`` blocks that ``keys`` lacks, in model order."""
    present = set(keys)
    return [key for key in wan_i2v_keys(num_blocks) if key not in present]


def scaled_fp8_format(keys: Iterable[str], metadata: dict[str, str] | None = None) -> bool:
    """True for ComfyUI's scaled fp8 or per-layer quantized files (``scaled_fp8``/``*.scale_weight`` keys, or
    quantization metadata): their stored weights are only meaningful multiplied by their scales."""
    keys = list(keys)
    return (any(k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(_SCALE_SUFFIXES) for k in keys)
            or _QUANTIZATION_METADATA in (metadata or {}))


def _scaled_fp8_refusal(name: str) -> CheckpointError:
    return CheckpointError(
        f"{name} is ComfyUI's scaled fp8 format (weights stored with per-layer scales). FlashPortrait's weights "
        f"replace most of its layers, and the scales stored for the old values would multiply the new ones, so "
        f"it cannot be the base. Select the bf16 (or fp16) Wan 2.1 I2V 14B file, "
        f"wan2.1_i2v_720p_14B_bf16.safetensors, and set weight_dtype to fp8_e4m3fn for the same memory; a plain "
        f"fp8 file without scales (e.g. ..._fp8_e4m3fn.safetensors) works too")


@dataclass(frozen=True)
class DitLayout:
    """Where each weight of the FlashPortrait DiT comes from, decided from keys and shapes alone (nothing read)."""

    #: Bare Wan key -> (BASE or FLASHPORTRAIT, the key's name in that file).
    weights: dict[str, tuple[str, str]]
    #: Block -> {"emo_k_proj": key in the FlashPortrait file, "emo_v_proj": ...}.
    emotion: dict[int, dict[str, str]]
    architecture: dict
    #: The FlashPortrait file holds every weight of the Wan I2V DiT: no Wan base is read.
    complete: bool

    @property
    def overlaid(self) -> int:
        """Weights taken from the FlashPortrait file."""
        return sum(1 for source, _ in self.weights.values() if source == FLASHPORTRAIT)

    def describe(self, wan_name: str, flashportrait_name: str) -> str:
        blocks = f"emotion attention in {len(self.emotion)} blocks"
        if self.complete:
            return (f"{flashportrait_name} holds a complete Wan 2.1 I2V DiT ({len(self.weights)} weights) and "
                    f"{blocks}; no Wan base file is read")
        return (f"{flashportrait_name} laid over {wan_name}: {self.overlaid} of {len(self.weights)} weights from "
                f"{flashportrait_name}, the other {len(self.weights) - self.overlaid} from {wan_name}; {blocks}")


def _bare_names(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Bare Wan key -> the key as the file names it."""
    prefix = dit_key_prefix(state_dict)
    return {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}


def _emotion_keys(bare: dict[str, str]) -> dict[int, dict[str, str]]:
    emotion: dict[int, dict[str, str]] = {}
    for key, file_key in bare.items():
        match = _EMOTION_KEY.match(key)
        if match:
            emotion.setdefault(int(match.group(1)), {})[match.group(2)] = file_key
    return emotion


def flashportrait_holds_complete_dit(flashportrait: dict[str, torch.Tensor]) -> bool:
    """True when a FlashPortrait file carries every Wan 2.1 I2V DiT weight (no base model is needed)."""
    bare = _bare_names(flashportrait)
    if "head.modulation" not in bare or "blocks.0.self_attn.q.weight" not in bare:
        return False
    blocks = {int(k.split(".")[1]) for k in bare if k.startswith("blocks.")}
    return not missing_wan_i2v_keys(bare, max(blocks) + 1)


def _check_image_to_video(arch: dict, name: str) -> None:
    if not arch["image_to_video"] or arch["in_dim"] != 36:
        raise CheckpointError(f"{name} is a Wan text-to-video (or other) model (in_dim {arch['in_dim']}, image "
                              f"attention {arch['image_to_video']}); FlashPortrait needs the Wan 2.1 image-to-video "
                              f"model (in_dim 36)")


def plan_flashportrait_dit(flashportrait: dict[str, torch.Tensor], wan_base: dict[str, torch.Tensor] | None,
                           wan_name: str = "Wan model", flashportrait_name: str = "FlashPortrait weights",
                           wan_metadata: dict[str, str] | None = None,
                           flashportrait_metadata: dict[str, str] | None = None) -> DitLayout:
    """Check two files (tensors or meta tensors: only keys, shapes and dtypes are used) and lay the FlashPortrait
    weights over the Wan base, as published (non-strict overlay). ``wan_base`` None: the FlashPortrait file must
    hold the whole DiT. Raises ``CheckpointError`` naming the file when one is not what its input expects."""
    fp_bare = _bare_names(flashportrait)
    emotion = _emotion_keys(fp_bare)
    if not emotion:
        raise CheckpointError(f"{flashportrait_name} is {identify_checkpoint(flashportrait)}, not a FlashPortrait "
                              f"transformer (no 'blocks.N.cross_attn.emo_k_proj.weight' keys). Select "
                              f"FlashPortrait's transformer.pt from models/flashportrait")
    if scaled_fp8_format(flashportrait, flashportrait_metadata):
        raise _scaled_fp8_refusal(flashportrait_name)
    emotion_file_keys = {k for pair in emotion.values() for k in pair.values()}
    overlay = {k: fk for k, fk in fp_bare.items() if fk not in emotion_file_keys}
    weights: dict[str, tuple[str, str]] = {}
    if wan_base is None:
        missing = missing_wan_i2v_keys(overlay, max(emotion) + 1)
        if missing:
            raise CheckpointError(f"{flashportrait_name} holds only part of the Wan DiT ({len(overlay)} weights, "
                                  f"{len(missing)} missing, e.g. {missing[:3]}): select the Wan 2.1 I2V 14B model "
                                  f"in wan_model to lay it over")
        arch = describe_dit({k: flashportrait[fk] for k, fk in overlay.items()})
        _check_image_to_video(arch, flashportrait_name)
        base_shapes: dict[str, torch.Size] = {}
    else:
        base_bare = {k: fk for k, fk in _bare_names(wan_base).items() if not _EMOTION_KEY.match(k)}
        try:
            arch = describe_dit({k: wan_base[fk] for k, fk in base_bare.items()})
        except CheckpointError:
            raise CheckpointError(f"{wan_name} is {identify_checkpoint(wan_base)}, not a Wan DiT. Select the Wan "
                                  f"2.1 I2V 14B diffusion model (e.g. wan2.1_i2v_720p_14B_bf16.safetensors) from "
                                  f"models/diffusion_models") from None
        _check_image_to_video(arch, wan_name)
        if scaled_fp8_format(wan_base, wan_metadata):
            raise _scaled_fp8_refusal(wan_name)
        weights.update({k: (BASE, fk) for k, fk in base_bare.items()})
        base_shapes = {k: wan_base[fk].shape for k, fk in base_bare.items()}
    source_name = wan_name if wan_base is not None else flashportrait_name
    if set(emotion) != set(range(arch["num_blocks"])) or any(len(p) != 2 for p in emotion.values()):
        raise CheckpointError(f"{flashportrait_name} have emotion projections for blocks {sorted(emotion)} but "
                              f"{source_name} has {arch['num_blocks']} blocks; the files do not belong together")
    for key, file_key in overlay.items():
        shape = flashportrait[file_key].shape
        if key in base_shapes and base_shapes[key] != shape:
            raise CheckpointError(f"{flashportrait_name} do not fit {wan_name}: '{key}' is {list(shape)} there "
                                  f"and {list(base_shapes[key])} in the Wan model. Use the 14B I2V model")
    for block, pair in emotion.items():
        for name, file_key in pair.items():
            shape = flashportrait[file_key].shape
            if len(shape) != 2 or shape[0] != arch["dim"]:
                raise CheckpointError(f"{flashportrait_name}: blocks.{block}.cross_attn.{name}.weight is "
                                      f"{list(shape)}, expected [{arch['dim']}, token width]")
    weights.update({k: (FLASHPORTRAIT, fk) for k, fk in overlay.items()})
    return DitLayout(weights=weights, emotion=emotion, architecture=arch, complete=wan_base is None)


def merge_flashportrait_dit(wan_base: dict[str, torch.Tensor] | None, flashportrait: dict[str, torch.Tensor],
                            wan_name: str = "Wan model", flashportrait_name: str = "FlashPortrait weights"
                            ) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """The merged Wan state dict and the emotion projections per block, from tensors already in memory (see
    ``plan_flashportrait_dit``; the loader node reads the files tensor by tensor instead)."""
    layout = plan_flashportrait_dit(flashportrait, wan_base, wan_name, flashportrait_name)
    files = {BASE: wan_base, FLASHPORTRAIT: flashportrait}
    merged = {key: files[source][file_key] for key, (source, file_key) in layout.weights.items()}
    emotion = {block: {name: flashportrait[fk] for name, fk in pair.items()} for block, pair in layout.emotion.items()}
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
