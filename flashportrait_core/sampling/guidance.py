"""The published classifier-free guidance over the emotion and text conditions (four branches)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidancePass:
    """One model pass of a guided step: which prompt it reads and whether the emotion attention is on."""

    name: str
    negative_prompt: bool  # the negative prompt instead of the prompt
    emotion: bool  # the emotion attention at ip_scale (False: ip_scale 0)


PASSES = {
    "posi": GuidancePass("posi", negative_prompt=False, emotion=True),
    "no_emo": GuidancePass("no_emo", negative_prompt=False, emotion=False),
    "no_cond": GuidancePass("no_cond", negative_prompt=True, emotion=False),
    "no_text": GuidancePass("no_text", negative_prompt=True, emotion=True),
}


def guidance_passes(emo_cfg: float, text_cfg: float) -> tuple[str, ...]:
    """Which model passes a guided step needs (names of ``PASSES``), as the published loop decides them."""
    if emo_cfg > 1.0:
        return ("posi", "no_emo", "no_cond") if text_cfg != 1.0 else ("posi", "no_emo")
    return ("posi", "no_text") if text_cfg != 1.0 else ("posi",)


def combine_guidance(predictions: dict[str, torch.Tensor], emo_cfg: float, text_cfg: float) -> torch.Tensor:
    """Combine the passes of ``guidance_passes`` (any prediction that is linear in the model output: velocity,
    noise or denoised latents).

    - emo_cfg > 1, text_cfg != 1: no_cond + text_cfg (no_emo - no_cond) + emo_cfg (posi - no_emo)
    - emo_cfg > 1, text_cfg == 1: no_emo + emo_cfg (posi - no_emo)
    - emo_cfg <= 1, text_cfg != 1: no_text + text_cfg (posi - no_text)   (no_text keeps the emotion attention)
    - emo_cfg <= 1, text_cfg == 1: posi
    """
    posi = predictions["posi"]
    if emo_cfg > 1.0:
        no_emo = predictions["no_emo"]
        if text_cfg != 1.0:
            no_cond = predictions["no_cond"]
            return no_cond + text_cfg * (no_emo - no_cond) + emo_cfg * (posi - no_emo)
        return no_emo + emo_cfg * (posi - no_emo)
    if text_cfg != 1.0:
        no_text = predictions["no_text"]
        return no_text + text_cfg * (posi - no_text)
    return posi
