"""The sampler's widgets (acceleration, schedule, step update, target speed-up) turned into one consistent run."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .alp import PRESETS, ALPConfig, config_for_speedup, preset
from .schedules import DISTILLED_4STEP, DISTILLED_TIMESTEPS, PUBLISHED, SIMPLE, sampling_sigmas
from .solvers import STEP_SOLVERS

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
                     target_speedup: float = 0.0, schedule: str = PUBLISHED, denoise: float = 1.0
                     ) -> SamplingChoice:
    """The sampler's widgets turned into one consistent run, or a ValueError naming the conflict and the fix.

    - ``schedule``: the noise levels of the ``steps`` computed steps (``schedules.SCHEDULES``; default the
      published grid). ``denoise`` < 1 runs the last ``steps`` steps of a longer grid (refining a latent).
    - ``4-step LoRA``: the distilled schedule with Euler steps; ALP is off (with warm-up and last step always
      computed, 4 steps leave nothing worth forecasting); ``steps`` and ``schedule`` are not used.
    - ``target_speedup`` replaces the speed-up of the chosen ALP preset; with ``off`` or ``4-step LoRA`` there is
      nothing it could apply to, so it is refused rather than switching ALP on.
    - A multistep solver (adams2/adams3) and ALP do not combine: ALP moves a window by integrating its own
      forecast over a skipped step and a computed step is an Euler step, so a multistep update on top would
      mix stale forecast increments into its history. One or the other.
    """
    check_sampling_widgets(acceleration, solver, target_speedup, schedule)
    if acceleration == FOUR_STEP_LORA:
        if solver != "euler":
            raise ValueError(f"sampler {solver!r} with acceleration '{FOUR_STEP_LORA}': the distillation LoRA was "
                             f"trained for Euler steps at its four timesteps; set sampler to euler")
        sigmas = sampling_sigmas(DISTILLED_4STEP, 4, shift, denoise)
        notes = (f"{FOUR_STEP_LORA}: timesteps {'/'.join(map(str, DISTILLED_TIMESTEPS))} (sigmas "
                 f"{', '.join(f'{s:.4g}' for s in sigmas.tolist())}), Euler, ALP off; steps={steps} and "
                 f"schedule '{schedule}' not used",)
        return SamplingChoice(sigmas, "euler", None, notes)
    alp = config_for_speedup(target_speedup) if target_speedup else preset(acceleration)
    notes = (f"ALP target {target_speedup:g}x instead of the {acceleration} preset's "
             f"{preset(acceleration).speedup:g}x",) if target_speedup else ()
    if solver != "euler" and alp.enabled:
        raise ValueError(f"sampler {solver!r} and acceleration '{acceleration}' do not combine: ALP forecasts the "
                         f"skipped steps of an Euler trajectory. Set acceleration to off to use {solver}, or set "
                         f"sampler to euler to use ALP")
    if steps < MIN_STEPS_FOR.get(solver, 1):
        raise ValueError(f"sampler {solver!r} needs at least {MIN_STEPS_FOR[solver]} steps (unstable on coarser "
                         f"grids), got {steps}; use adams2 or more steps")
    return SamplingChoice(sampling_sigmas(schedule, steps, shift, denoise), solver, alp if alp.enabled else None, notes)


def check_sampling_widgets(acceleration: str, solver: str, target_speedup: float, schedule: str) -> None:
    """The checks of ``resolve_sampling`` that need no model: run them before any expensive node (ComfyUI's
    input validation), so a choice that cannot run is refused before extraction and loading."""
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    if solver not in STEP_SOLVERS:
        raise ValueError(f"sampler must be one of {STEP_SOLVERS}, got {solver!r}")
    if schedule not in (PUBLISHED, SIMPLE):
        raise ValueError(f"schedule must be '{PUBLISHED}' or '{SIMPLE}', got {schedule!r}")
    if not math.isfinite(target_speedup) or target_speedup < 0:
        raise ValueError(f"target_speedup must be 0 (use the preset) or a speed-up above 1, got {target_speedup}")
    if target_speedup and acceleration in ("off", FOUR_STEP_LORA):
        raise ValueError(f"target_speedup {target_speedup:g} needs an ALP preset (quality, balanced or fast), but "
                         f"acceleration is '{acceleration}'; choose a preset, or set target_speedup to 0")
    if 0 < target_speedup <= 1.0:
        raise ValueError(f"target_speedup {target_speedup:g} is no speed-up (1 = every step computed); set it "
                         f"above 1, or 0 to use the '{acceleration}' preset, or set acceleration to off")
