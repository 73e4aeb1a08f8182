"""Key conversion for the published 4-step distillation LoRA (``fast_lora_rank64.safetensors``).

Published format (LightX2V style, applied by merging into the Wan DiT's weights):
- ``diffusion_model.<layer>.lora_down.weight`` [rank, in] and ``.lora_up.weight`` [out, rank]
  (or ``lora_A`` / ``lora_B``): W += strength * up @ down. No alpha scaling.
- ``diffusion_model.<layer>.diff`` (W += strength * diff, norms), ``.diff_b`` (bias += strength * diff_b),
- ``diffusion_model.blocks.<i>.diff_m``: modulation += strength * diff_m.
The ``diffusion_model.`` prefix is optional there. Layer names are the Wan 2.1 ones, which ComfyUI's Wan
model keeps, so ComfyUI's LoRA loaders map lora_down/lora_up, diff and diff_b unchanged.

Two things differ in ComfyUI (0.3.75): ``diff_m`` keys are not recognised (logged as "lora key not loaded"
and skipped, so the modulation change is lost), and an ``.alpha`` key would scale the product by
alpha / rank where the published merge does not. ``convert_step_distill_lora`` rewrites only those: diff_m
becomes ``<block>.modulation.diff`` (ComfyUI's generic diff on the modulation parameter) and alpha keys are
dropped; every other key keeps its name and tensor.
"""
from __future__ import annotations

from typing import Mapping

import torch

PREFIX = "diffusion_model."
LOW_RANK_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight")
DIFF_SUFFIXES = (".diff", ".diff_b")
MODULATION_DIFF = ".diff_m"
ALPHA = ".alpha"


def _with_prefix(key: str) -> str:
    return key if key.startswith(PREFIX) else PREFIX + key


def convert_step_distill_lora(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published LoRA with keys that ComfyUI's LoRA loaders apply exactly as the published merge does.

    Raises ValueError when the file holds no LoRA or diff keys at all (not a LoRA of this format).
    """
    recognised = LOW_RANK_SUFFIXES + DIFF_SUFFIXES + (MODULATION_DIFF,)
    if not any(key.endswith(recognised) for key in state_dict):
        sample = ", ".join(list(state_dict)[:3]) or "no keys"
        raise ValueError(f"the file holds no LoRA keys (expected '<layer>.lora_down.weight' / '.lora_up.weight', "
                         f"'.diff', '.diff_b' or '.diff_m'; found {sample}); is this the step-distillation LoRA?")
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith(ALPHA):
            continue  # the published merge applies up @ down unscaled; ComfyUI would scale by alpha / rank
        if key.endswith(MODULATION_DIFF):
            key = key[: -len(MODULATION_DIFF)] + ".modulation.diff"
        converted[_with_prefix(key)] = tensor
    return converted


def lora_key_summary(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Counts of the key kinds in a LoRA file: low-rank pairs, weight diffs, bias diffs, modulation diffs, alphas."""
    return {
        "low_rank_pairs": sum(key.endswith((".lora_down.weight", ".lora_A.weight")) for key in state_dict),
        "weight_diffs": sum(key.endswith(".diff") for key in state_dict),
        "bias_diffs": sum(key.endswith(".diff_b") for key in state_dict),
        "modulation_diffs": sum(key.endswith(MODULATION_DIFF) for key in state_dict),
        "alphas": sum(key.endswith(ALPHA) for key in state_dict),
    }
