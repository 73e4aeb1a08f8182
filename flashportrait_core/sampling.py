"""Flow-matching schedule and the sliding-window denoising loop."""
from __future__ import annotations

import torch


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted flow-matching noise levels, from 1 down to 0 (``steps + 1`` values, float64).

    sigma(t) = shift * t / (1 + (shift - 1) * t) over t evenly spaced in [1, 0]; shift > 1 spends
    more steps at high noise, where a video's layout and motion are decided.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)
