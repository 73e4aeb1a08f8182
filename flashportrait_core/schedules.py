"""Noise schedules of the sampler: the standard shifted grid and the 4-step distilled one.

The published fast path pairs the step-distillation LoRA (``fast_lora_rank64.safetensors``) with four
fixed timesteps, 1000/750/500/250 of 1000 training timesteps. Each timestep t picks the unshifted noise
level t / 1000, which is then shifted like the standard grid (shift 5 at 720p), and the last step goes to 0.
The steps themselves are plain flow-matching Euler steps: x_next = x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .alp import PRESETS, ALPConfig, config_for_speedup, preset
from .sampling import flow_sigmas
from .solvers import STEP_SOLVERS

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


# The sampler's acceleration choices: the ALP presets, and the published 4-step distillation LoRA path.
FOUR_STEP_LORA = "4-step LoRA"
ACCELERATIONS = (*PRESETS, FOUR_STEP_LORA)
# Adams-3 is unstable on very coarse grids (testbed: worse than Euler at 4-5 steps, better from 8).
MIN_STEPS_FOR = {"adams3": 8}


@dataclass(frozen=True)
class SamplingChoice:
    """What the sampler runs: noise levels, step update, ALP settings (None: every step computed), notes."""

    sigmas: torch.Tensor
    solver: str
    alp: ALPConfig | None
    notes: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def resolve_sampling(acceleration: str, steps: int, shift: float, solver: str = "euler",
                     target_speedup: float = 0.0) -> SamplingChoice:
    """The sampler's widgets turned into one consistent run, or a ValueError naming the conflict and the fix.

    - ``4-step LoRA``: the distilled schedule with Euler steps; ALP is off (with warm-up and last step always
      computed, 4 steps leave nothing worth forecasting) and ``steps`` is not used.
    - A multistep solver (adams2/adams3) and ALP do not combine: ALP moves a window by integrating its own
      forecast over a skipped step and a computed step is an Euler step, so a multistep update on top would
      mix stale forecast increments into its history. One or the other.
    """
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    if solver not in STEP_SOLVERS:
        raise ValueError(f"sampler must be one of {STEP_SOLVERS}, got {solver!r}")
    if 0.0 < target_speedup < 1.0:
        raise ValueError(f"target_speedup {target_speedup} is below 1; use 0 for the preset or a value >= 1")
    if acceleration == FOUR_STEP_LORA:
        if solver != "euler":
            raise ValueError(f"sampler {solver!r} with acceleration '{FOUR_STEP_LORA}': the distillation LoRA was "
                             f"trained for Euler steps at its four timesteps; set sampler to euler")
        sigmas = distilled_sigmas(shift)
        notes = [f"{FOUR_STEP_LORA}: timesteps {'/'.join(map(str, DISTILLED_TIMESTEPS))} (sigmas "
                 f"{', '.join(f'{s:.4g}' for s in sigmas.tolist())}), Euler, ALP off; steps={steps} not used"]
        if target_speedup:
            notes.append(f"target_speedup {target_speedup:g} not used with {FOUR_STEP_LORA}")
        return SamplingChoice(sigmas, "euler", None, tuple(notes))
    alp = config_for_speedup(target_speedup) if target_speedup >= 1.0 else preset(acceleration)
    if solver != "euler" and alp.enabled:
        what = f"target_speedup {target_speedup:g}" if target_speedup >= 1.0 else f"acceleration '{acceleration}'"
        raise ValueError(f"sampler {solver!r} and {what} do not combine: ALP forecasts the skipped steps of an "
                         f"Euler trajectory. Set acceleration to off (and target_speedup to 0) to use {solver}, "
                         f"or set sampler to euler to use ALP")
    if steps < MIN_STEPS_FOR.get(solver, 1):
        raise ValueError(f"sampler {solver!r} needs at least {MIN_STEPS_FOR[solver]} steps (unstable on coarser "
                         f"grids), got {steps}; use adams2 or more steps")
    return SamplingChoice(flow_sigmas(steps, shift), solver, alp if alp.enabled else None)
