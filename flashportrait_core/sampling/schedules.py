"""Noise schedules of the sampler: the published grid, ComfyUI's "simple" grid, and the 4-step distilled one.

All grids are flow-matching noise levels from 1 down to 0 (float64); a flow step is x_next = x + (sigma_next - sigma) v.

- ``published``: what the published inference runs, diffusers' ``FlowMatchEulerDiscreteScheduler`` with the
  Wan config (1000 training timesteps, shift 5, no dynamic shifting). Its training levels are shift(t / 1000) for
  t = 1000 .. 1, so sigma_min = shift(1/1000). ``set_timesteps(N)`` spaces N levels linearly from 1 to that
  (already shifted) sigma_min, shifts them once more and appends 0. The double shift is why its last model calls
  are low (0.1698, 0.0244 at N = 30, shift 5). ComfyUI's ``normal`` scheduler on a shifted flow model gives the
  same grid (it spaces timesteps linearly between the model's sigma_max and sigma_min and maps them through the
  shift).
- ``simple``: ComfyUI's ``simple`` scheduler on the same model, evenly spaced training levels from the top
  (close to shift(linspace(1, 0, N + 1))); its last model calls are 6x higher (0.2642, 0.1496 at N = 30).
- ``distilled 4-step``: the published fast path pairs the step-distillation LoRA (``fast_lora_rank64``) with four
  fixed timesteps, 1000/750/500/250 of 1000; each picks the unshifted level t / 1000, shifted like the others,
  then 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

PUBLISHED = "published"
SIMPLE = "simple"
DISTILLED_4STEP = "distilled 4-step"
SCHEDULES = (PUBLISHED, SIMPLE, DISTILLED_4STEP)

DISTILLED_TIMESTEPS = (1000, 750, 500, 250)
TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching shift: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _check(steps: int, shift: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")


def published_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """The published grid (diffusers' flow-matching Euler scheduler): ``steps + 1`` levels ending in 0.

    linspace(1, sigma_min, steps) with sigma_min = shift(1 / train_timesteps), shifted again, then 0.
    """
    _check(steps, shift)
    sigma_min = shift_sigma(torch.tensor(1.0 / train_timesteps, dtype=torch.float64), shift)
    base = torch.linspace(1.0, float(sigma_min), steps, dtype=torch.float64)
    return torch.cat([shift_sigma(base, shift), torch.zeros(1, dtype=torch.float64)])


def simple_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """ComfyUI's ``simple`` scheduler on a shifted flow model (``steps + 1`` levels): every
    (train_timesteps / steps)-th of the model's training levels shift(t / train_timesteps), t = train_timesteps .. 1,
    from the top, then 0. shift > 1 spends more steps at high noise, where a video's layout and motion are decided."""
    _check(steps, shift)
    stride = train_timesteps / steps
    timesteps = torch.tensor([train_timesteps - int(x * stride) for x in range(steps)], dtype=torch.float64)
    return torch.cat([shift_sigma(timesteps / train_timesteps, shift), torch.zeros(1, dtype=torch.float64)])


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
    """The noise levels of ``schedule``; ``steps`` is not used by the distilled grid."""
    if schedule == PUBLISHED:
        return published_sigmas(steps, shift)
    if schedule == SIMPLE:
        return simple_sigmas(steps, shift)
    if schedule == DISTILLED_4STEP:
        return distilled_sigmas(shift)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def partial_denoise(sigmas_for_steps, steps: int, denoise: float) -> torch.Tensor:
    """The last ``steps`` steps of a longer grid, as ComfyUI's KSampler does for ``denoise`` < 1.

    ``sigmas_for_steps(n)`` gives an n-step grid; with denoise d the grid has int(steps / d) steps and the run
    starts ``steps`` steps before its end, so it refines an existing latent instead of starting from noise.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise > 0.9999:
        return sigmas_for_steps(steps)
    return sigmas_for_steps(int(steps / denoise))[-(steps + 1):]


def sampling_sigmas(schedule: str, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The noise levels a run samples: ``schedule`` over ``steps`` steps, its tail for ``denoise`` < 1.

    The distilled grid has fixed timesteps, so a partial run takes the last round(4 * denoise) of them."""
    if schedule == DISTILLED_4STEP:
        sigmas = distilled_sigmas(shift)
        if not 0.0 < denoise <= 1.0:
            raise ValueError(f"denoise must be in (0, 1], got {denoise}")
        return sigmas[-(max(1, round((len(sigmas) - 1) * denoise)) + 1):]
    return partial_denoise(lambda n: schedule_sigmas(schedule, n, shift), steps, denoise)
