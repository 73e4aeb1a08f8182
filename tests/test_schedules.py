"""Noise schedules: the published grid (diffusers' flow-matching Euler), ComfyUI's simple grid, the 4-step one;
and the sampler's widget rules."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.sampling.choice import FOUR_STEP_LORA, resolve_sampling
from flashportrait_core.sampling.loop import sample_flow_windows
from flashportrait_core.sampling.schedules import (DISTILLED_4STEP, PUBLISHED, SIMPLE, distilled_sigmas,
                                                   published_sigmas, schedule_sigmas, simple_sigmas)
from flashportrait_core.sampling.windows import plan_windows

# diffusers 0.31 FlowMatchEulerDiscreteScheduler(shift=5).set_timesteps(30).sigmas, as listed in the reference
# facts (4 decimals).
PUBLISHED_30 = [1.0, 0.9929, 0.9855, 0.9776, 0.9692, 0.9602, 0.9507, 0.9405, 0.9297, 0.918, 0.9054, 0.8919,
                0.8772, 0.8613, 0.844, 0.825, 0.8042, 0.7813, 0.7559, 0.7275, 0.6957, 0.6598, 0.6189, 0.5719,
                0.5174, 0.4533, 0.3769, 0.2843, 0.1698, 0.0244, 0.0]


def shifted(s: float, shift: float) -> float:
    return shift * s / (1 + (shift - 1) * s)


def test_published_grid_at_30_steps_is_the_listed_one():
    sigmas = published_sigmas(30, 5.0)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 31
    assert sigmas.tolist() == pytest.approx(PUBLISHED_30, abs=6e-5)
    assert torch.equal(schedule_sigmas(PUBLISHED, 30, 5.0), sigmas)


@pytest.mark.parametrize("steps", range(4, 51))
def test_published_grid_is_monotone_and_its_last_call_is_the_shifted_sigma_min(steps):
    sigmas = published_sigmas(steps, 5.0)
    assert len(sigmas) == steps + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # The training levels end at sigma_min = shift(1/1000); set_timesteps shifts that level once more.
    assert sigmas[-2].item() == pytest.approx(shifted(shifted(1e-3, 5.0), 5.0), rel=1e-12)


def test_published_grid_formula_at_other_shifts():
    sigmas = published_sigmas(10, 3.0)
    sigma_min = shifted(1e-3, 3.0)
    for i, value in enumerate(sigmas[:-1].tolist()):
        assert value == pytest.approx(shifted(1 + i * (sigma_min - 1) / 9, 3.0), rel=1e-12)


def test_simple_grid_takes_every_nth_training_level():
    sigmas = simple_sigmas(30, 5.0)
    # x = 28, 29: training timesteps 1000 - int(x * 1000 / 30) = 67, 34, shifted.
    assert sigmas[-3:].tolist() == pytest.approx([shifted(0.067, 5.0), shifted(0.034, 5.0), 0.0], rel=1e-12)
    assert sigmas[-3:].tolist() == pytest.approx([0.2642, 0.1496, 0.0], abs=1e-4)
    assert torch.equal(schedule_sigmas(SIMPLE, 30, 5.0), sigmas)
    assert torch.allclose(simple_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_distilled_sigmas_are_the_shifted_published_timesteps():
    # Timesteps 1000/750/500/250 of 1000 -> unshifted 1, 0.75, 0.5, 0.25; shift 5: 5s / (1 + 4s); then 0.
    expected = torch.tensor([1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(schedule_sigmas(DISTILLED_4STEP, 30, 5.0), expected, atol=1e-15)
    assert torch.allclose(distilled_sigmas(1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert schedule_sigmas(DISTILLED_4STEP, 30, 3.0)[1].item() == pytest.approx(2.25 / 2.5)


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
    choice = resolve_sampling(FOUR_STEP_LORA, 30, 5.0)
    assert torch.equal(choice.sigmas, distilled_sigmas(5.0))
    assert (choice.steps, choice.solver, choice.alp) == (4, "euler", None)
    assert "ALP off" in choice.notes[0] and "steps=30" in choice.notes[0] and "not used" in choice.notes[0]
    with pytest.raises(ValueError, match="needs an ALP preset"):
        resolve_sampling(FOUR_STEP_LORA, 30, 5.0, target_speedup=5.0)
    with pytest.raises(ValueError, match="trained for Euler steps"):
        resolve_sampling(FOUR_STEP_LORA, 30, 5.0, solver="adams2")


def test_presets_schedules_solvers_and_their_conflicts():
    from flashportrait_core.sampling.alp import preset

    quality = resolve_sampling("quality", 30, 5.0)
    assert quality.alp == preset("quality") and quality.solver == "euler"
    assert torch.equal(quality.sigmas, published_sigmas(30, 5.0))
    assert torch.equal(resolve_sampling("off", 30, 5.0, schedule=SIMPLE).sigmas, simple_sigmas(30, 5.0))
    off = resolve_sampling("off", 30, 5.0)
    assert off.alp is None and off.notes == ()
    assert resolve_sampling("off", 30, 5.0, solver="adams2").solver == "adams2"
    targeted = resolve_sampling("balanced", 12, 5.0, target_speedup=5.0)
    assert targeted.alp.speedup == 5.0 and "target 5x instead of the balanced preset's 4x" in targeted.notes[0]
    with pytest.raises(ValueError, match="do not combine.*acceleration to off"):
        resolve_sampling("quality", 30, 5.0, solver="adams2")
    with pytest.raises(ValueError, match="at least 8 steps"):
        resolve_sampling("off", 5, 5.0, solver="adams3")
    with pytest.raises(ValueError, match="acceleration must be one of"):
        resolve_sampling("turbo", 30, 5.0)
    with pytest.raises(ValueError, match="schedule must be"):
        resolve_sampling("off", 30, 5.0, schedule="karras")


@pytest.mark.parametrize("target", [0.5, 1.0, 4.0])
def test_a_target_never_switches_alp_on_by_itself(target):
    with pytest.raises(ValueError, match="target_speedup"):
        resolve_sampling("off", 30, 5.0, target_speedup=target)


@pytest.mark.parametrize("target", [0.5, 1.0, -2.0, float("nan")])
def test_a_target_that_is_no_speedup_is_refused(target):
    with pytest.raises(ValueError, match="target_speedup"):
        resolve_sampling("quality", 30, 5.0, target_speedup=target)


@pytest.mark.parametrize("steps", [4, 9, 30, 50])
def test_grids_equal_comfyuis_normal_and_simple_schedulers(steps):
    """ComfyUI's ``normal`` scheduler on a shift-5 flow model is the published grid; its ``simple`` is ours."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pack import import_pack

    import_pack()
    import comfy.model_sampling
    import comfy.samplers

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    class Config:
        sampling_settings = {"shift": 5.0, "multiplier": 1000}

    model_sampling = FlowSampling(Config())
    normal = comfy.samplers.calculate_sigmas(model_sampling, "normal", steps).double()
    simple = comfy.samplers.calculate_sigmas(model_sampling, "simple", steps).double()
    assert torch.allclose(normal, published_sigmas(steps, 5.0), atol=1e-6, rtol=0)
    assert torch.allclose(simple, simple_sigmas(steps, 5.0), atol=1e-6, rtol=0)
