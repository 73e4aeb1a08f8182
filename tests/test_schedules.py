"""Noise schedules: the standard shifted grid and the published 4-step distilled one."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.sampling import flow_sigmas, sample_flow_windows
from flashportrait_core.schedules import DISTILLED_4STEP, STANDARD, distilled_sigmas, schedule_sigmas
from flashportrait_core.windows import plan_windows


def test_distilled_sigmas_are_the_shifted_published_timesteps():
    # Timesteps 1000/750/500/250 of 1000 -> unshifted 1, 0.75, 0.5, 0.25; shift 5: 5s / (1 + 4s); then 0.
    expected = torch.tensor([1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(schedule_sigmas(DISTILLED_4STEP, 30, 5.0), expected, atol=1e-15)
    assert torch.allclose(distilled_sigmas(1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert schedule_sigmas(DISTILLED_4STEP, 30, 3.0)[1].item() == pytest.approx(2.25 / 2.5)


def test_standard_schedule_is_the_shifted_grid():
    assert torch.equal(schedule_sigmas(STANDARD, 30, 5.0), flow_sigmas(30, 5.0))


def test_schedule_inputs_are_checked():
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule_sigmas("turbo", 4, 5.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        distilled_sigmas(5.0, (1000, 500, 750))
    with pytest.raises(ValueError, match="shift must be positive"):
        distilled_sigmas(0.0)


def test_distilled_schedule_runs_four_euler_steps_over_windows():
    """Four steps over two overlapping windows; each step is x + (sigma_next - sigma) * v (published step)."""
    sigmas = distilled_sigmas(5.0)
    plan = plan_windows(13, 8, 4)
    noise = torch.randn(1, 2, 13, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []

    def velocity(x, sigma, window, step):
        seen.append((round(sigma, 6), window, step))
        return -x  # framewise, so the blend of overlapping windows is exact

    out = sample_flow_windows(noise, sigmas, plan, velocity)
    assert sorted({s for s, _, _ in seen}, reverse=True) == [1.0, 0.9375, 0.833333, 0.625]
    assert len(seen) == 4 * len(plan.windows)
    scale = 1.0
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        scale *= 1.0 - (sigma_next - sigma)
    assert torch.allclose(out, noise * scale, atol=1e-6)


def test_four_step_lora_choice_runs_euler_on_the_distilled_sigmas_without_alp():
    from flashportrait_core.schedules import FOUR_STEP_LORA, resolve_sampling

    choice = resolve_sampling(FOUR_STEP_LORA, 30, 5.0)
    assert torch.equal(choice.sigmas, distilled_sigmas(5.0))
    assert (choice.steps, choice.solver, choice.alp) == (4, "euler", None)
    assert "ALP off" in choice.notes[0] and "steps=30 not used" in choice.notes[0]
    assert "target_speedup 5 not used" in resolve_sampling(FOUR_STEP_LORA, 30, 5.0, target_speedup=5.0).notes[1]
    with pytest.raises(ValueError, match="trained for Euler steps"):
        resolve_sampling(FOUR_STEP_LORA, 30, 5.0, solver="adams2")


def test_presets_solvers_and_their_conflicts():
    from flashportrait_core.alp import preset
    from flashportrait_core.schedules import resolve_sampling

    quality = resolve_sampling("quality", 30, 5.0)
    assert quality.alp == preset("quality") and quality.solver == "euler"
    assert torch.equal(quality.sigmas, flow_sigmas(30, 5.0))
    assert resolve_sampling("off", 30, 5.0).alp is None
    assert resolve_sampling("off", 30, 5.0, solver="adams2").solver == "adams2"
    assert resolve_sampling("off", 12, 5.0, target_speedup=5.0).alp.speedup == 5.0
    with pytest.raises(ValueError, match="do not combine.*acceleration to off"):
        resolve_sampling("quality", 30, 5.0, solver="adams2")
    with pytest.raises(ValueError, match="target_speedup 4 do not combine"):
        resolve_sampling("off", 30, 5.0, solver="adams3", target_speedup=4.0)
    with pytest.raises(ValueError, match="at least 8 steps"):
        resolve_sampling("off", 5, 5.0, solver="adams3")
    with pytest.raises(ValueError, match="below 1"):
        resolve_sampling("off", 30, 5.0, target_speedup=0.5)
    with pytest.raises(ValueError, match="acceleration must be one of"):
        resolve_sampling("turbo", 30, 5.0)
