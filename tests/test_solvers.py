"""Flow-matching solvers and their polynomial helpers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashportrait_core.sampling.schedules import simple_sigmas
from flashportrait_core.sampling.solvers import (
    divided_differences,
    lagrange_step_weights,
    newton_basis_integrals,
    newton_basis_values,
    sample_adams,
    sample_euler,
    sample_unipc,
)

TAU = 0.3


def gaussian_velocity(mean: torch.Tensor, tau: float = TAU):
    """Exact velocity of a single Gaussian N(mean, tau^2 I) under x = (1 - s) x0 + s noise."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        keep = 1.0 - sigma
        var = keep * keep * tau * tau + sigma * sigma
        denoised = mean + keep * tau * tau / var * (x - keep * mean)
        return (x - denoised) / sigma

    return velocity


def gaussian_solution(mean: torch.Tensor, noise: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """The ODE's exact endpoint: the deviation from the mean scales with sqrt(var), from 1 to tau."""
    return mean + tau * noise


@pytest.fixture()
def problem():
    gen = torch.Generator().manual_seed(3)
    mean = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    return gaussian_velocity(mean), noise, gaussian_solution(mean, noise)


def test_divided_differences_recover_polynomial_on_nonuniform_nodes():
    nodes = [0.93, 0.61, 0.35, 0.147]
    coeffs = [0.5, -2.0, 3.0, 1.25]  # 0.5 - 2 s + 3 s^2 + 1.25 s^3
    poly = np.polynomial.Polynomial(coeffs)
    values = [torch.tensor(poly(n), dtype=torch.float64) for n in nodes]
    newton = divided_differences(nodes, values)
    # The top divided difference of a cubic is its leading coefficient.
    assert float(newton[-1]) == pytest.approx(1.25, abs=1e-12)
    for at in (1.0, 0.7, 0.2, 0.0):
        basis = newton_basis_values(nodes, at)
        assert sum(b * float(c) for b, c in zip(basis, newton)) == pytest.approx(poly(at), abs=1e-12)
    integrals = newton_basis_integrals(nodes, 0.35, 0.0)
    exact = poly.integ()(0.0) - poly.integ()(0.35)
    assert sum(w * float(c) for w, c in zip(integrals, newton)) == pytest.approx(exact, abs=1e-12)


def test_divided_differences_reject_repeated_nodes():
    with pytest.raises(ValueError, match="distinct"):
        divided_differences([0.5, 0.5], [torch.zeros(1), torch.ones(1)])


def test_lagrange_step_weights_integrate_polynomials_exactly():
    nodes = [0.9, 0.7, 0.4]
    weights = lagrange_step_weights(nodes, 0.4, 0.25)
    poly = np.polynomial.Polynomial([1.0, -0.5, 2.0])
    exact = poly.integ()(0.25) - poly.integ()(0.4)
    assert sum(w * poly(n) for w, n in zip(weights, nodes)) == pytest.approx(exact, abs=1e-13)
    assert sum(weights) == pytest.approx(0.25 - 0.4, abs=1e-14)


def test_adams_order_one_is_euler(problem):
    velocity, noise, _ = problem
    grid = simple_sigmas(12, 5.0)
    torch.testing.assert_close(sample_adams(velocity, noise, grid, 1), sample_euler(velocity, noise, grid),
                               rtol=0, atol=1e-12)


def test_adams_is_exact_for_polynomial_velocity_of_matching_degree():
    grid = simple_sigmas(9, 5.0)
    coeffs = torch.tensor([0.3, -1.1, 0.7], dtype=torch.float64)  # v(s) = 0.3 - 1.1 s + 0.7 s^2

    def velocity(x, sigma):
        return torch.full_like(x, float(coeffs[0] + coeffs[1] * sigma + coeffs[2] * sigma ** 2))

    x0 = torch.zeros(4, dtype=torch.float64)
    out = sample_adams(velocity, x0, grid, 3)
    # Adams-3 is exact once three velocities are known; the first two steps use orders 1 and 2.
    poly = np.polynomial.Polynomial(coeffs.numpy())
    g = [float(s) for s in grid]
    expected = float(velocity(torch.zeros(1), g[0])) * (g[1] - g[0])
    slope = (poly(g[1]) - poly(g[0])) / (g[1] - g[0])
    expected += poly(g[1]) * (g[2] - g[1]) + slope * (g[2] - g[1]) ** 2 / 2
    expected += poly.integ()(g[-1]) - poly.integ()(g[2])
    # Nodes 0.007 apart near sigma = 1 amplify rounding ~1e4x: exact up to float64 rounding.
    torch.testing.assert_close(out, torch.full_like(out, expected), rtol=0, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_converges_to_the_exact_endpoint(problem, order):
    velocity, noise, exact = problem
    grid_coarse, grid_fine = simple_sigmas(10, 1.0), simple_sigmas(40, 1.0)
    err = [float((sample_unipc(velocity, noise, g, order) - exact).abs().max()) for g in (grid_coarse, grid_fine)]
    euler_err = float((sample_euler(velocity, noise, grid_fine) - exact).abs().max())
    assert err[1] < err[0]
    if order >= 2:
        # Second order or better: 4x the steps cuts the error far more than Euler's 4x.
        assert err[0] / err[1] > 10.0
        assert err[1] < euler_err / 10.0


def test_multistep_solvers_beat_euler_on_the_shifted_grid(problem):
    velocity, noise, exact = problem
    grid = simple_sigmas(20, 5.0)
    euler_err = float((sample_euler(velocity, noise, grid) - exact).pow(2).mean())
    for sampler in (lambda: sample_adams(velocity, noise, grid, 2), lambda: sample_unipc(velocity, noise, grid, 2)):
        assert float((sampler() - exact).pow(2).mean()) < euler_err


def test_solver_inputs_are_checked(problem):
    velocity, noise, _ = problem
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(velocity, noise, [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="order"):
        sample_adams(velocity, noise, simple_sigmas(4, 5.0), 7)
    with pytest.raises(ValueError, match="sigma = 0"):
        sample_unipc(velocity, noise, [1.0, 0.5, 0.1])


# --------------------------------------------------------------------------------------------------
# Step updates inside the windowed loop
# --------------------------------------------------------------------------------------------------

def _framewise_mixture_velocity(means: torch.Tensor):
    """A per-frame velocity for latents [1, C, F, H, W]: every frame follows its own Gaussian (mean per frame),
    so overlapping windows predict the same velocity for a frame and the blend is exact."""

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        keep = 1.0 - sigma
        var = keep * keep * TAU * TAU + sigma * sigma
        mean = means[:, :, : x.shape[2]] if means.shape[2] != x.shape[2] else means
        denoised = mean + keep * TAU * TAU / var * (x - keep * mean)
        return (x - denoised) / sigma

    return velocity


@pytest.mark.parametrize("solver", ["euler", "adams2", "adams3"])
def test_windowed_loop_steps_like_the_plain_solver(solver):
    from flashportrait_core.sampling.loop import sample_flow_windows
    from flashportrait_core.sampling.windows import plan_windows

    gen = torch.Generator().manual_seed(3)
    frames = 13
    means = torch.randn(1, 4, frames, 3, 3, generator=gen)
    noise = torch.randn(1, 4, frames, 3, 3, generator=gen)
    plan = plan_windows(frames, 8, 4)
    assert len(plan.windows) > 1
    sigmas = simple_sigmas(12, 5.0)

    def window_velocity(x, sigma, window, step):
        start, end = plan.windows[window]
        return _framewise_mixture_velocity(means[:, :, start:end])(x, sigma)

    windowed = sample_flow_windows(noise, sigmas, plan, window_velocity, solver=solver)
    whole = _framewise_mixture_velocity(means)
    plain = sample_euler(whole, noise, sigmas) if solver == "euler" else sample_adams(whole, noise, sigmas,
                                                                                       int(solver[-1]))
    assert torch.allclose(windowed, plain, atol=1e-5)
    # The solvers differ: a multistep run is closer to the exact endpoint than Euler at 12 steps.
    exact = gaussian_solution(means, noise)
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    euler_error = rms(sample_euler(whole, noise, sigmas) - exact)
    if solver != "euler":
        assert rms(windowed - exact) < 0.6 * euler_error


def test_euler_step_update_is_the_published_line_bit_for_bit():
    from flashportrait_core.sampling.solvers import make_step_update

    v = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(make_step_update("euler")(0.9, 0.7, v), (0.7 - 0.9) * v)
    with pytest.raises(ValueError, match="solver must be one of"):
        make_step_update("unipc")
