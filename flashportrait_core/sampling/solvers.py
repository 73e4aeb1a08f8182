"""Flow-matching ODE solvers and the polynomial helpers they share with ALP.

Conventions (Wan flow matching): x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the
velocity v = dx/dsigma, and sampling integrates from sigma = 1 down to sigma = 0 over a grid such as
``simple_sigmas(steps, shift)``. A ``VelocityFn`` is ``velocity(x, sigma) -> v`` with guidance already
combined, so one call is one (guided) model evaluation.

Solvers here:
- ``sample_euler``: the reference sampler (one evaluation per step).
- ``sample_adams``: linear multistep (Adams-Bashforth) of order 1-4 on a non-uniform grid; the weights
  integrate the Lagrange polynomial through the last velocities over each step, as k-diffusion's
  ``sample_lms`` does, but exactly (Gauss-Legendre) instead of by adaptive quadrature.
- ``sample_unipc``: UniPC (predictor-corrector, data prediction, B(h) = expm1(h)) for flow matching;
  one evaluation per step, the corrector reuses the evaluation of the next step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Polynomial helpers (float64 on the host; the tensors only ever see linear combinations)
# --------------------------------------------------------------------------------------------------

def _gauss_legendre(points: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights that integrate any polynomial of degree < 2 * points exactly over [a, b]."""
    nodes, weights = np.polynomial.legendre.leggauss(points)
    half = 0.5 * (b - a)
    return 0.5 * (a + b) + half * nodes, half * weights


def newton_basis_integrals(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Integrals over [a, b] of the Newton basis N_0 = 1, N_k(s) = prod_{j<k} (s - nodes[j]).

    ``len(nodes)`` basis polynomials are returned; N_k has degree k, so Gauss-Legendre with
    ``len(nodes)`` points is exact.
    """
    count = len(nodes)
    if count == 0:
        return []
    s, w = _gauss_legendre(max(1, count), float(a), float(b))
    basis = np.ones_like(s)
    out = []
    for k in range(count):
        out.append(float(np.dot(w, basis)))
        basis = basis * (s - float(nodes[k]))
    return out


def newton_basis_values(nodes: Sequence[float], at: float) -> list[float]:
    """Values N_k(at) of the Newton basis on ``nodes`` (see ``newton_basis_integrals``)."""
    out, basis = [], 1.0
    for node in nodes:
        out.append(basis)
        basis *= at - float(node)
    return out


def divided_differences(nodes: Sequence[float], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Newton divided differences f[s_0], f[s_0, s_1], ..., f[s_0..s_k] of tensors sampled at ``nodes``.

    Divided differences (not differences in step index) because the sigma grid is non-uniform.
    """
    if len(nodes) != len(values):
        raise ValueError(f"nodes and values must have the same length, got {len(nodes)} and {len(values)}")
    if len(set(float(n) for n in nodes)) != len(nodes):
        raise ValueError(f"nodes must be distinct, got {list(nodes)}")
    table = list(values)
    coefficients = [table[0]]
    for k in range(1, len(nodes)):
        table = [
            (table[i + 1] - table[i]) / (float(nodes[i + k]) - float(nodes[i]))
            for i in range(len(table) - 1)
        ]
        coefficients.append(table[0])
    return coefficients


def lagrange_step_weights(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Weights w_j with integral_a^b p = sum_j w_j * f(nodes[j]) for the interpolating polynomial p."""
    count = len(nodes)
    s, w = _gauss_legendre(max(1, count), float(a), float(b))
    out = []
    for j in range(count):
        basis = np.ones_like(s)
        for k in range(count):
            if k != j:
                basis = basis * (s - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float(np.dot(w, basis)))
    return out


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------

def _sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 values (start and end), got {len(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be strictly decreasing (from noise to data)")
    return values


def sample_euler(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Flow-matching Euler: x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i)."""
    grid = _sigma_list(sigmas)
    for i in range(len(grid) - 1):
        x = x + (grid[i + 1] - grid[i]) * velocity(x, grid[i])
    return x


def sample_adams(
    velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], order: int
) -> torch.Tensor:
    """Adams-Bashforth of ``order`` on the given grid (lower orders while the history fills up)."""
    if not 1 <= order <= 4:
        raise ValueError(f"order must be 1..4, got {order}")
    grid = _sigma_list(sigmas)
    history_sigmas: list[float] = []
    history_velocities: list[torch.Tensor] = []
    for i in range(len(grid) - 1):
        history_sigmas = (history_sigmas + [grid[i]])[-order:]
        history_velocities = (history_velocities + [velocity(x, grid[i])])[-order:]
        weights = lagrange_step_weights(history_sigmas, grid[i], grid[i + 1])
        x = x + sum(w * v for w, v in zip(weights, history_velocities))
    return x


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at pure noise."""
    return -math.inf if sigma >= 1.0 else math.log((1.0 - sigma) / sigma)


def sample_unipc(
    velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], order: int = 2
) -> torch.Tensor:
    """UniPC-p with the UniC corrector for flow matching (data prediction x0 = x - sigma * v).

    Exponential integrator in lambda = log((1 - sigma) / sigma). A history point at sigma = 1
    (lambda = -inf) only enters first-order terms; the order drops near the end (fewer steps
    left than the order), and the step to sigma = 0 returns the last data prediction, as
    Euler's last step does.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1..3, got {order}")
    grid = _sigma_list(sigmas)
    if grid[-1] != 0.0:
        raise ValueError("sample_unipc expects the grid to end at sigma = 0")
    steps = len(grid) - 1
    history: list[tuple[float, torch.Tensor]] = [(_half_log_snr(grid[0]), x - grid[0] * velocity(x, grid[0]))]
    for i in range(steps):
        s_now, s_next = grid[i], grid[i + 1]
        data_now = history[-1][1]
        if s_next == 0.0:
            return data_now
        finite = [item for item in history if math.isfinite(item[0])]
        p = max(1, min(order, len(finite), steps - i))
        lam_now, lam_next = _half_log_snr(s_now), _half_log_snr(s_next)
        h = lam_next - lam_now
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        ratios: list[float] = []
        differences: list[torch.Tensor] = []
        for k in range(1, p):
            lam_k, data_k = finite[-1 - k]
            r_k = (lam_k - lam_now) / h
            ratios.append(r_k)
            differences.append((data_k - data_now) / r_k)
        ratios.append(1.0)
        rows, rhs = [], []
        h_phi_k = h_phi_1 / hh - 1.0 if math.isfinite(hh) else -1.0
        factorial = 1
        for j in range(1, p + 1):
            rows.append([r ** (j - 1) for r in ratios])
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial if math.isfinite(hh) else h_phi_k
        r_mat, rhs_vec = np.array(rows), np.array(rhs)
        alpha_next = 1.0 - s_next
        x_first = (s_next / s_now) * x - alpha_next * h_phi_1 * data_now
        x_pred = x_first
        if p >= 2:
            rho_p = [0.5] if p == 2 else list(np.linalg.solve(r_mat[:-1, :-1], rhs_vec[:-1]))
            x_pred = x_first - alpha_next * b_h * sum(r * d for r, d in zip(rho_p, differences))
        data_next = x_pred - s_next * velocity(x_pred, s_next)
        rho_c = [0.5] if p == 1 else list(np.linalg.solve(r_mat, rhs_vec))
        correction = sum(r * d for r, d in zip(rho_c[:-1], differences)) + rho_c[-1] * (data_next - data_now)
        x = x_first - alpha_next * b_h * correction
        history = (history + [(lam_next, data_next)])[-order:]
    return x


# --------------------------------------------------------------------------------------------------
# Step updates for samplers that assemble the velocity themselves (the windowed loop)
# --------------------------------------------------------------------------------------------------

# Sampler choices of the windowed loop. UniPC is not among them: on the testbed it gains under 1 dB over
# Euler at 5-10 steps (benchmarks/alp_solvers.py), and its corrector needs the model at the predicted point.
STEP_SOLVERS = ("euler", "adams2", "adams3")

# (sigma, sigma_next, velocity at sigma) -> increment of x over the step
StepUpdate = Callable[[float, float, torch.Tensor], torch.Tensor]


@dataclass
class StepHistory:
    """What a multistep update carries from one step to the next: the last blended velocities and their sigmas.

    Kept outside the update so that a resumable loop can save it with the latents and put it back."""

    sigmas: list[float] = field(default_factory=list)
    velocities: list[torch.Tensor] = field(default_factory=list)


def make_step_update(solver: str, history: StepHistory | None = None) -> StepUpdate:
    """The latent increment of one step for ``solver``.

    ``euler``: (sigma_next - sigma) * v. ``adamsK``: Adams-Bashforth of order K over the velocities passed
    in so far (lower order while the history fills), exactly as ``sample_adams``; the velocities are kept in
    ``history`` (a fresh one when None; pass a restored one to continue an interrupted run). Every update is
    linear in the velocities, so blending window velocities and then stepping equals stepping each window and
    blending.
    """
    if solver == "euler":
        return lambda sigma, sigma_next, velocity: (sigma_next - sigma) * velocity
    if solver not in STEP_SOLVERS:
        raise ValueError(f"solver must be one of {STEP_SOLVERS}, got {solver!r}")
    order = int(solver[len("adams"):])
    history = StepHistory() if history is None else history

    def adams_update(sigma: float, sigma_next: float, velocity: torch.Tensor) -> torch.Tensor:
        history.sigmas.append(float(sigma))
        history.velocities.append(velocity)
        del history.sigmas[:-order], history.velocities[:-order]
        weights = lagrange_step_weights(history.sigmas, sigma, sigma_next)
        return sum(w * v for w, v in zip(weights, history.velocities))

    return adams_update


def sample_adams_denoised(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                          extra_args: dict | None = None, callback: Callable[[dict], None] | None = None,
                          disable: bool | None = None, order: int = 2) -> torch.Tensor:
    """Adams-Bashforth of ``order`` in k-diffusion's sampler form: ``model(x, sigma * ones, **extra_args)``
    returns denoised latents (flow matching: v = (x - denoised) / sigma); ``callback`` sees every step.

    The same update as ``make_step_update(f"adams{order}")``; ``disable`` (a progress bar switch) is unused.
    """
    extra_args = {} if extra_args is None else extra_args
    step_update = make_step_update(f"adams{order}")
    ones = x.new_ones([x.shape[0]])
    grid = _sigma_list(sigmas)
    for i in range(len(grid) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + step_update(grid[i], grid[i + 1], (x - denoised) / grid[i])
    return x
