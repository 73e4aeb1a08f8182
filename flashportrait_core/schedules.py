"""Noise schedules of the sampler: the standard shifted grid and the 4-step distilled one.

The published fast path pairs the step-distillation LoRA (``fast_lora_rank64.safetensors``) with four
fixed timesteps, 1000/750/500/250 of 1000 training timesteps. Each timestep t picks the unshifted noise
level t / 1000, which is then shifted like the standard grid (shift 5 at 720p), and the last step goes to 0.
The steps themselves are plain flow-matching Euler steps: x_next = x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .sampling import flow_sigmas

STANDARD = "standard"
DISTILLED_4STEP = "distilled 4-step"
SCHEDULES = (STANDARD, DISTILLED_4STEP)

DISTILLED_TIMESTEPS = (1000, 750, 500, 250)
TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching shift: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def distilled_sigmas(shift: float, timesteps: Sequence[int] = DISTILLED_TIMESTEPS,
                     train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """Noise levels of a step-distilled model: shifted t / train_timesteps for each timestep, then 0 (float64)."""
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if not timesteps or any(not 0 < t <= train_timesteps for t in timesteps):
        raise ValueError(f"timesteps must be in (0, {train_timesteps}], got {list(timesteps)}")
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {list(timesteps)}")
    base = torch.tensor([t / train_timesteps for t in timesteps], dtype=torch.float64)
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])


def schedule_sigmas(schedule: str, steps: int, shift: float) -> torch.Tensor:
    """The sampler's noise levels for ``schedule``; ``steps`` applies to the standard grid only."""
    if schedule == STANDARD:
        return flow_sigmas(steps, shift)
    if schedule == DISTILLED_4STEP:
        return distilled_sigmas(shift)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
