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
