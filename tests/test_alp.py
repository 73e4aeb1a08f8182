"""Adaptive Latent Prediction: exactness of the forecaster, call accounting, presets, determinism."""
from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from flashportrait_core.sampling.alp import (
    PRESETS,
    ALPConfig,
    alp_step,
    block_change_magnitudes,
    forecast_increment,
    forecast_velocity,
    layer_change_ratio,
    new_window_state,
    preset,
    record_computed,
    sample_alp,
    should_compute,
    step_budget,
)
from flashportrait_core.sampling.schedules import simple_sigmas
from flashportrait_core.sampling.solvers import sample_euler

DRIVING = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "driving"
NEVER = math.inf  # a tolerance or trust that never forces a computed step


@pytest.fixture(scope="module")
def face_means() -> torch.Tensor:
    """Every 6th frame of a real driving video, 16x16 RGB in [-1, 1]."""
    frames = []
    with av.open(str(DRIVING / "lp_d0.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % 6 == 0:
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].double()
                frames.append(torch.nn.functional.interpolate(rgb / 127.5 - 1, size=(16, 16), mode="area")[0])
    return torch.stack(frames)


def mixture_velocity(means: torch.Tensor, tau: float = 0.3):
    """Exact flow-matching velocity of an equal-weight Gaussian mixture over ``means``."""
    flat_means = means.reshape(len(means), -1)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        keep = 1.0 - sigma
        flat = x.reshape(x.shape[0], -1)
        var = keep * keep * tau * tau + sigma * sigma
        dist = torch.cdist(flat, keep * flat_means).pow(2)
        mean = torch.softmax(-dist / (2 * var), dim=-1) @ flat_means
        denoised = mean + keep * tau * tau / var * (flat - keep * mean)
        return ((flat - denoised) / sigma).reshape(x.shape)

    return velocity


class CountingVelocity:
    """Wraps a velocity function and records every call's sigma (independent of ALP's bookkeeping)."""

    def __init__(self, fn):
        self.fn = fn
        self.sigmas: list[float] = []

    def __call__(self, x, sigma):
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma)


def polynomial_velocity(coefficients: list[torch.Tensor]):
    """v(x, sigma) = sum_m a_m sigma^m, whatever x: an exact polynomial trajectory."""

    def velocity(x, sigma):
        return sum(a * sigma ** m for m, a in enumerate(coefficients))

    return velocity


def poly_integral(coefficients: list[torch.Tensor], a: float, b: float) -> torch.Tensor:
    return sum(c * (b ** (m + 1) - a ** (m + 1)) / (m + 1) for m, c in enumerate(coefficients))


def random_coefficients(degree: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(degree + 1)]


# --------------------------------------------------------------------------------------------------
# Exactness of the forecaster on polynomial trajectories
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("integration", ["polynomial", "euler"])
def test_forecast_reproduces_polynomial_trajectories_at_matching_order(degree, integration):
    coefficients = random_coefficients(degree, seed=degree)
    velocity = polynomial_velocity(coefficients)
    sigmas = simple_sigmas(30, 5.0)
    grid = [float(s) for s in sigmas]
    state = new_window_state(sigmas, ALPConfig(max_order=degree, integration=integration))
    x = torch.zeros_like(coefficients[0])
    computed = [0, 6, 13, 19][: degree + 1]  # non-uniform spacing in sigma
    for i in computed:
        record_computed(state, i, x, velocity(x, grid[i]))
    for i in (20, 24, 27, 29):
        increment, _ = forecast_increment(state, i)
        if integration == "polynomial":
            expected = poly_integral(coefficients, grid[i], grid[i + 1])
        else:
            expected = (grid[i + 1] - grid[i]) * velocity(x, grid[i])
        torch.testing.assert_close(increment, expected, rtol=1e-9, atol=1e-11)
    mean_velocity = poly_integral(coefficients, grid[25], grid[26]) / (grid[26] - grid[25])
    if integration == "polynomial":
        torch.testing.assert_close(forecast_velocity(state, 25), mean_velocity, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_one_order_too_low_is_not_exact(degree):
    coefficients = random_coefficients(degree, seed=10 + degree)
    velocity = polynomial_velocity(coefficients)
    sigmas = simple_sigmas(30, 5.0)
    grid = [float(s) for s in sigmas]
    state = new_window_state(sigmas, ALPConfig(max_order=degree - 1))
    x = torch.zeros_like(coefficients[0])
    for i in [0, 6, 13, 19][: degree + 1]:
        record_computed(state, i, x, velocity(x, grid[i]))
    increment, _ = forecast_increment(state, 24)
    assert float((increment - poly_integral(coefficients, grid[24], grid[25])).abs().max()) > 1e-4


def test_whole_run_on_polynomial_trajectory_matches_exact_integration():
    degree = 2
    coefficients = random_coefficients(degree, seed=7)
    counting = CountingVelocity(polynomial_velocity(coefficients))
    sigmas = simple_sigmas(30, 5.0)
    grid = [float(s) for s in sigmas]
    config = ALPConfig(max_order=degree, warmup_steps=3, final_steps=1, first_trust=NEVER, error_tolerance=NEVER)
    x0 = torch.zeros_like(coefficients[0])
    out, state = sample_alp(counting, x0, sigmas, config)
    assert state.computed_steps == [0, 1, 2, 29]
    # Computed steps are Euler steps; every skipped step integrates the (exact) forecast polynomial.
    expected = x0.clone()
    for i in range(30):
        if i in state.computed_steps:
            expected = expected + (grid[i + 1] - grid[i]) * counting.fn(x0, grid[i])
        else:
            expected = expected + poly_integral(coefficients, grid[i], grid[i + 1])
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Call accounting, presets, determinism (real face frames as mixture means)
# --------------------------------------------------------------------------------------------------

def noise_for(seed: int, shape=(1, 3, 16, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", ["quality", "balanced", "fast"])
def test_skipped_steps_make_no_model_call_and_counts_match_the_wrapper(face_means, name):
    counting = CountingVelocity(mixture_velocity(face_means))
    sigmas = simple_sigmas(30, 5.0)
    grid = [float(s) for s in sigmas]
    out, state = sample_alp(counting, noise_for(1), sigmas, preset(name))
    report = state.report()
    assert report["computed"] == len(counting.sigmas)
    assert report["computed"] + report["skipped"] == 30
    assert report["skipped"] > 0
    assert counting.sigmas == [grid[i] for i in state.computed_steps]
    assert not set(state.skipped_steps) & set(state.computed_steps)
    assert report["computed"] <= step_budget(30, preset(name))
    # Warm-up and the last step are always computed.
    assert state.computed_steps[0] == 0 and state.computed_steps[-1] == 29
    assert torch.isfinite(out).all()


def test_step_by_step_calls_match_per_step_flags(face_means):
    counting = CountingVelocity(mixture_velocity(face_means))
    sigmas = simple_sigmas(30, 5.0)
    state = new_window_state(sigmas, preset("fast"))
    x = noise_for(2)
    flags = []
    for i in range(30):
        before = len(counting.sigmas)
        x, computed = alp_step(state, x, i, counting)
        assert len(counting.sigmas) - before == int(computed)
        flags.append(computed)
    assert sum(flags) == len(state.computed_steps) == len(counting.sigmas)


def test_off_is_bit_identical_to_euler(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    x = noise_for(3)
    out, state = sample_alp(velocity, x, sigmas, preset("off"))
    assert torch.equal(out, sample_euler(velocity, x, sigmas))
    assert state.report() == {"computed": 30, "skipped": 0, "computed_steps": list(range(30))}


def test_alp_is_deterministic(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    runs = [sample_alp(velocity, noise_for(4), sigmas, preset("fast")) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1].computed_steps == runs[1][1].computed_steps


def test_alp_fast_tracks_the_full_run_better_than_euler_at_equal_cost(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    x = noise_for(5)
    full = sample_euler(velocity, x, sigmas)
    out, state = sample_alp(velocity, x, sigmas, preset("fast"))
    cheap = sample_euler(velocity, x, simple_sigmas(len(state.computed_steps), 5.0))
    assert float((out - full).pow(2).mean()) < float((cheap - full).pow(2).mean())


def test_windows_keep_separate_histories(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    xs = [noise_for(6), noise_for(7)]
    alone = [sample_alp(velocity, x, sigmas, preset("balanced"))[0] for x in xs]
    states = [new_window_state(sigmas, preset("balanced")) for _ in xs]
    for i in range(30):  # interleaved, as a window loop runs them
        xs = [alp_step(st, x, i, velocity)[0] for st, x in zip(states, xs)]
    assert all(torch.equal(a, b) for a, b in zip(alone, xs))


def test_budget_follows_the_speedup():
    assert step_budget(30, preset("fast")) == 5
    assert step_budget(30, preset("quality")) == 10
    assert step_budget(30, preset("off")) == 30
    # Never below warm-up plus final steps.
    assert step_budget(4, ALPConfig(speedup=10.0, warmup_steps=1, final_steps=1)) == 2


# --------------------------------------------------------------------------------------------------
# Dial 1 and Dial 2 mechanics
# --------------------------------------------------------------------------------------------------

def test_accumulated_error_estimate_forces_a_computed_step():
    # v changes linearly in sigma: the order-1 top term is non-zero, so a small tolerance recomputes often.
    coefficients = random_coefficients(1, seed=3)
    velocity = polynomial_velocity(coefficients)
    sigmas = simple_sigmas(30, 5.0)
    loose = sample_alp(velocity, coefficients[0] * 0 + 1.0, sigmas,
                       ALPConfig(max_order=1, warmup_steps=2, first_trust=NEVER, error_tolerance=NEVER))[1]
    tight = sample_alp(velocity, coefficients[0] * 0 + 1.0, sigmas,
                       ALPConfig(max_order=1, warmup_steps=2, first_trust=NEVER, error_tolerance=1e-3))[1]
    assert len(loose.computed_steps) == 3
    assert len(tight.computed_steps) > len(loose.computed_steps)


def test_first_trust_bounds_the_stale_forecast(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    x = noise_for(8)
    near = sample_alp(velocity, x, sigmas, ALPConfig(first_trust=0.01, error_tolerance=NEVER))[1]
    far = sample_alp(velocity, x, sigmas, ALPConfig(first_trust=0.2, error_tolerance=NEVER))[1]
    assert near.computed_steps[1] < far.computed_steps[1]


def test_layer_change_ratio_is_deep_over_shallow():
    assert layer_change_ratio([0.1, 0.2, 0.3]) == pytest.approx(3.0)
    assert layer_change_ratio([0.1, 0.1, 0.1, 0.1, 0.4, 0.4]) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2"):
        layer_change_ratio([0.1])
    with pytest.raises(ValueError, match="non-negative"):
        layer_change_ratio([0.1, -1.0])


def test_block_change_magnitudes_are_relative():
    prev = [torch.ones(4), 2 * torch.ones(4)]
    now = [1.1 * torch.ones(4), 3 * torch.ones(4)]
    assert block_change_magnitudes(prev, now) == pytest.approx([0.1, 0.5])


@pytest.mark.parametrize("changes, expect", [([0.1, 0.1], "full"), ([0.1, 0.2], "damped"), ([0.1, 0.5], "dropped")])
def test_layer_dial_damps_then_drops_the_top_order(changes, expect):
    coefficients = random_coefficients(2, seed=5)
    velocity = polynomial_velocity(coefficients)
    sigmas = simple_sigmas(30, 5.0)
    grid = [float(s) for s in sigmas]
    config = ALPConfig(max_order=2, layer_ratio_limit=1.5)

    def state_with(block_changes):
        state = new_window_state(sigmas, config)
        x = torch.zeros_like(coefficients[0])
        for i in (0, 8, 16):
            record_computed(state, i, x, velocity(x, grid[i]), block_changes if i == 16 else None)
        return state

    plain = forecast_increment(state_with(None), 20)
    dialled = forecast_increment(state_with(changes), 20)
    if expect == "full":
        torch.testing.assert_close(dialled[0], plain[0])
    elif expect == "damped":
        ratio = changes[1] / changes[0]
        torch.testing.assert_close(dialled[0], plain[0] - plain[1] + (1.5 / ratio) * plain[1])
    else:
        lower = new_window_state(sigmas, replace_order(config, 1))
        x = torch.zeros_like(coefficients[0])
        for i in (8, 16):
            record_computed(lower, i, x, velocity(x, grid[i]))
        torch.testing.assert_close(dialled[0], forecast_increment(lower, 20)[0])


def replace_order(config: ALPConfig, order: int) -> ALPConfig:
    from dataclasses import replace

    return replace(config, max_order=order)


def test_should_compute_is_pure(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    state = new_window_state(sigmas, preset("fast"))
    x = noise_for(9)
    for i in range(10):
        x, _ = alp_step(state, x, i, velocity)
    snapshot = (state.error_estimate, list(state.computed_steps), list(state.skipped_steps))
    first = should_compute(state, x, 10)
    assert should_compute(state, x, 10) == first
    assert snapshot == (state.error_estimate, list(state.computed_steps), list(state.skipped_steps))


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown ALP preset"):
        preset("turbo")
    with pytest.raises(ValueError, match="speedup"):
        ALPConfig(speedup=0.5)
    with pytest.raises(ValueError, match="integration"):
        ALPConfig(integration="rk4")
    with pytest.raises(ValueError, match="warmup_steps"):
        ALPConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="decreasing"):
        new_window_state([0.0, 1.0], ALPConfig())
    state = new_window_state(simple_sigmas(10, 5.0), ALPConfig())
    with pytest.raises(ValueError, match="step_index"):
        should_compute(state, torch.zeros(1), 10)
    with pytest.raises(ValueError, match="first step must be computed"):
        forecast_increment(state, 3)


def test_presets_are_named_and_ordered_by_speed():
    assert set(PRESETS) >= {"off", "quality", "balanced", "fast"}
    budgets = [step_budget(30, preset(n)) for n in ("off", "quality", "balanced", "fast")]
    assert budgets == sorted(budgets, reverse=True)
    assert not preset("off").enabled
    assert np.isclose(30 / step_budget(30, preset("fast")), 6.0)


def test_half_precision_latents_forecast_in_float32_and_keep_their_dtype(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    x64 = noise_for(10)

    def bf16_velocity(x, sigma):
        return velocity(x.double(), sigma).to(torch.bfloat16)

    out16, state = sample_alp(bf16_velocity, x64.to(torch.bfloat16), sigmas, preset("fast"))
    out64, state64 = sample_alp(velocity, x64, sigmas, preset("fast"))
    assert out16.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in state.history_velocities)
    assert state.computed_steps == state64.computed_steps
    # Extrapolation amplifies the velocities' own bf16 rounding (measured: RMS 0.026 against float64,
    # where bf16 Euler is off by 0.0024); still about 38 dB on data in [-1, 1].
    alp_error = float((out16.double() - out64).pow(2).mean().sqrt())
    assert alp_error < 0.05


def test_stored_latent_is_a_copy(face_means):
    velocity = mixture_velocity(face_means)
    sigmas = simple_sigmas(30, 5.0)
    state = new_window_state(sigmas, preset("fast"))
    x = noise_for(11)
    alp_step(state, x, 0, velocity)
    x.zero_()  # a sampler writing its blended latent in place
    assert float(state.latent_at_compute.abs().max()) > 0
