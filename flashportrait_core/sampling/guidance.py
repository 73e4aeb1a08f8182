"""The published classifier-free guidance over emotion and text conditions."""
from __future__ import annotations

import torch


def guidance_passes(emo_cfg: float, text_cfg: float) -> tuple[str, ...]:
    """Which model passes a guided step needs: a subset of ("posi", "no_emo", "no_cond")."""
    if emo_cfg <= 1.0:
        return ("posi",)
    if text_cfg != 1.0:
        return ("posi", "no_emo", "no_cond")
    return ("posi", "no_emo")


def combine_guidance(predictions: dict[str, torch.Tensor], emo_cfg: float, text_cfg: float) -> torch.Tensor:
    """Combine the passes of ``guidance_passes``.

    posi: prompt and emotion at ip_scale; no_emo: prompt, ip_scale 0; no_cond: negative prompt, ip_scale 0.
    emo_cfg > 1 and text_cfg != 1: no_cond + text_cfg (no_emo - no_cond) + emo_cfg (posi - no_emo);
    emo_cfg > 1 and text_cfg == 1: no_emo + emo_cfg (posi - no_emo); emo_cfg <= 1: posi alone.
    """
    posi = predictions["posi"]
    if emo_cfg <= 1.0:
        return posi
    no_emo = predictions["no_emo"]
    if text_cfg != 1.0:
        no_cond = predictions["no_cond"]
        return no_cond + text_cfg * (no_emo - no_cond) + emo_cfg * (posi - no_emo)
    return no_emo + emo_cfg * (posi - no_emo)
