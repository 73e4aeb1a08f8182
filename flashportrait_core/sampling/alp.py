"""Adaptive Latent Prediction (ALP): skip model evaluations by forecasting the velocity.

Within one context window the flow-matching trajectory is smooth once its first steps are done: the
velocity v(sigma) = dx/dsigma and its derivatives in sigma describe the latent's path. ALP evaluates the
(guided) model only at some steps, keeps the window's recent computed (sigma_j, v_j), and at the other
steps forecasts v with the Newton polynomial through them.

Formulas and why:
- Forecast: Newton form over divided differences in sigma (the grid is non-uniform, so differences in
  step index would be wrong), of order up to ``max_order`` over the most recent computed velocities.
- Latent update at a skipped step: the forecast polynomial is integrated exactly over [sigma_i,
  sigma_{i+1}], i.e. the step uses the interval-mean of the forecast velocity. Alternatives kept for
  measurement: ``"euler"`` (forecast evaluated at sigma_i, an Euler step) and ``"stale"`` (last computed
  v, what caching methods do). A computed step is a plain Euler step, so ALP with every step computed
  is exactly the Euler sampler.
- Dial 1, timestep-aware: right after a single computed velocity there is nothing to extrapolate, so the
  stale forecast is trusted while the latent's relative movement since that step,
  ||x - x_c|| / ||x_c||, stays under ``first_trust``. With two or more computed velocities, each skipped
  step adds an error estimate, the latent-space size of the forecast's highest-order Newton term
  integrated over the step, relative to ||x_c||; when the accumulated estimate would pass
  ``error_tolerance`` the step is computed. The highest term is what the forecast would lose by
  dropping one order, the usual (pessimistic) indicator in variable-order multistep methods.
- Budget: a target speed-up turns into a cap on computed steps per window. ``pace`` spreads what is
  left of it: no optional computed step before the window's sigma has dropped by
  ``pace * (sigma_c - sigma_end) / (remaining + 1)``, so early decisions cannot spend the whole budget.
- Dial 2, layer-aware: at a computed step the caller may pass per-block relative output changes since
  the previous computed step (shallow to deep). Their ratio, deep over shallow, above
  ``layer_ratio_limit`` means the network's late layers move faster than its early ones, i.e. the output
  is in a less predictable regime: the highest-order term is damped by limit / ratio, and dropped
  (order reduced by one) above twice the limit, until the next computed step. Off by default (no limit):
  measured on a trained video DiT it did not help.

Warm-up steps and the last steps are always computed. Each window owns an ``ALPWindowState``; nothing
is global, so windows never share history and the report (computed versus skipped steps per window)
is read off the states. Guidance is combined before the velocity reaches ALP, so a skipped step saves
every guided pass of that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from .solvers import divided_differences, newton_basis_integrals, newton_basis_values

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]

INTEGRATION_MODES = ("polynomial", "euler", "stale")


@dataclass(frozen=True)
class ALPConfig:
    """Settings of Adaptive Latent Prediction (see the module docstring for the meaning of each)."""

    enabled: bool = True
    max_order: int = 1
    warmup_steps: int = 1
    final_steps: int = 1
    speedup: float | None = None
    first_trust: float = 0.05
    error_tolerance: float = 0.01
    pace: float = 0.0
    integration: str = "polynomial"
    # Dial 2 is off by default (no limit): on the trained video DiT it never raised quality at any budget
    # (docs/benchmarks.md); 1.5 is the limit it was measured at.
    layer_ratio_limit: float = math.inf

    def __post_init__(self) -> None:
        if not 0 <= self.max_order <= 4:
            raise ValueError(f"max_order must be 0..4, got {self.max_order}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (nothing to forecast from), got {self.warmup_steps}")
        if self.final_steps < 0:
            raise ValueError(f"final_steps must be >= 0, got {self.final_steps}")
        if self.speedup is not None and self.speedup < 1.0:
            raise ValueError(f"speedup must be >= 1 (or None for no cap), got {self.speedup}")
        if self.first_trust < 0 or self.error_tolerance < 0:
            raise ValueError("first_trust and error_tolerance must be non-negative")
        if not 0.0 <= self.pace <= 1.0:
            raise ValueError(f"pace must be in [0, 1], got {self.pace}")
        if self.integration not in INTEGRATION_MODES:
            raise ValueError(f"integration must be one of {INTEGRATION_MODES}, got {self.integration!r}")
        if self.layer_ratio_limit <= 0:
            raise ValueError(f"layer_ratio_limit must be positive, got {self.layer_ratio_limit}")


# Settings per target speed-up, chosen on the trained video DiT (benchmarks/alp_trained.py: ComfyUI's WanModel
# trained on real faces; tuning clips from lp_d12/lp_d18, never the report videos): (speed-up, max_order,
# first_trust, error_tolerance, pace). Against the closed-form mixture's choice, the trained model's smoother
# trajectories take second order at 3x and 4x, and a looser tolerance (0.08) at 4x to 6x; 6x needs pace 0.5 so
# the last computed steps are not spent early.
_TUNED_ANCHORS = (
    (3.0, 2, 0.1, 0.02, 0.0),
    (4.0, 2, 0.1, 0.08, 0.0),
    (5.0, 1, 0.03, 0.08, 0.0),
    (6.0, 1, 0.1, 0.08, 0.5),
)


def config_for_speedup(speedup: float, **overrides) -> ALPConfig:
    """ALP settings for a target speed-up (model passes of the full run / passes with ALP).

    Between the tuned anchors the tolerance is interpolated log-linearly, first_trust and pace
    linearly in the speed-up, and the order is the nearer anchor's; outside them the nearest
    anchor's settings are used.
    """
    if not math.isfinite(speedup) or speedup < 1.0:
        raise ValueError(f"speedup must be a finite number >= 1, got {speedup}")
    anchors = _TUNED_ANCHORS
    if speedup <= anchors[0][0]:
        low = high = anchors[0]
    elif speedup >= anchors[-1][0]:
        low = high = anchors[-1]
    else:
        low, high = next((a, b) for a, b in zip(anchors, anchors[1:]) if a[0] <= speedup <= b[0])
    t = 0.0 if high[0] == low[0] else (speedup - low[0]) / (high[0] - low[0])
    values = dict(
        speedup=float(speedup),
        max_order=low[1] if t < 0.5 else high[1],
        first_trust=low[2] + t * (high[2] - low[2]),
        error_tolerance=low[3] if t == 0.0 else high[3] if t == 1.0 else
        math.exp(math.log(low[3]) + t * (math.log(high[3]) - math.log(low[3]))),
        pace=low[4] + t * (high[4] - low[4]),
    )
    values.update(overrides)
    return ALPConfig(**values)


PRESETS: dict[str, ALPConfig] = {
    "off": ALPConfig(enabled=False),
    "quality": config_for_speedup(3.0),
    "balanced": config_for_speedup(4.0),
    "fast": config_for_speedup(6.0),
}


def preset(name: str, **overrides) -> ALPConfig:
    """The named preset (``off``, ``quality``, ``balanced``, ``fast``), optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown ALP preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


@dataclass
class ALPWindowState:
    """Everything ALP remembers about one context window."""

    sigmas: tuple[float, ...]
    config: ALPConfig
    budget: int
    history_sigmas: list[float] = field(default_factory=list)
    history_velocities: list[torch.Tensor] = field(default_factory=list)
    latent_at_compute: torch.Tensor | None = None
    sigma_at_compute: float | None = None
    error_estimate: float = 0.0
    top_term_scale: float = 1.0
    order_cap: int = 0
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    layer_ratios: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def report(self) -> dict:
        """Counts for the user-facing report: computed and skipped steps of this window."""
        return {
            "computed": len(self.computed_steps),
            "skipped": len(self.skipped_steps),
            "computed_steps": list(self.computed_steps),
        }


def step_budget(steps: int, config: ALPConfig) -> int:
    """Computed steps allowed per window: all of them without a speed-up target."""
    forced = min(steps, config.warmup_steps + config.final_steps)
    if not config.enabled or config.speedup is None:
        return steps
    return max(forced, min(steps, math.ceil(steps / config.speedup - 1e-9)))


def new_window_state(sigmas: torch.Tensor | Sequence[float], config: ALPConfig) -> ALPWindowState:
    """A fresh state for one window sampled over ``sigmas`` (strictly decreasing, ``steps + 1`` values)."""
    grid = tuple(float(s) for s in sigmas)
    if len(grid) < 2 or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("sigmas must hold at least 2 strictly decreasing values")
    return ALPWindowState(sigmas=grid, config=config, budget=step_budget(len(grid) - 1, config),
                          order_cap=config.max_order)


def _forecast_precision(t: torch.Tensor) -> torch.Tensor:
    """Divided differences over sigma gaps of ~0.007 cancel badly in 16-bit floats: keep >= float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def _forecast_nodes(state: ALPWindowState) -> tuple[list[float], list[torch.Tensor]]:
    """Most recent first, as many as the current order allows."""
    count = min(len(state.history_sigmas), state.order_cap + 1)
    return state.history_sigmas[::-1][:count], state.history_velocities[::-1][:count]


def forecast_increment(state: ALPWindowState, step_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latent increment of a skipped step, and the forecast polynomial's highest-order term integrated
    over the step (the error indicator; None below order 1)."""
    if not state.history_velocities:
        raise ValueError("no computed velocity in this window yet; the first step must be computed")
    s_now, s_next = state.sigmas[step_index], state.sigmas[step_index + 1]
    nodes, values = _forecast_nodes(state)
    if len(nodes) == 1:
        return (s_next - s_now) * values[0], None
    coefficients = divided_differences(nodes, values)
    integrals = newton_basis_integrals(nodes, s_now, s_next)
    top = integrals[-1] * state.top_term_scale * coefficients[-1]
    mode = state.config.integration
    if mode == "polynomial":
        increment = sum(w * c for w, c in zip(integrals[:-1], coefficients[:-1])) + top
    elif mode == "euler":  # the forecast velocity at sigma_i, one Euler step
        at = newton_basis_values(nodes, s_now)
        scales = [1.0] * (len(at) - 1) + [state.top_term_scale]
        increment = (s_next - s_now) * sum(b * k * c for b, k, c in zip(at, scales, coefficients))
    else:  # "stale": the last computed velocity, what caching methods reuse
        increment = (s_next - s_now) * values[0]
    return increment, top


def forecast_velocity(state: ALPWindowState, step_index: int) -> torch.Tensor:
    """The velocity a skipped step uses: its latent increment divided by the step's sigma change."""
    increment, _ = forecast_increment(state, step_index)
    return increment / (state.sigmas[step_index + 1] - state.sigmas[step_index])


def _free_budget(state: ALPWindowState, step_index: int) -> int:
    final_left = sum(1 for j in range(step_index, state.steps) if j >= state.steps - state.config.final_steps)
    return state.budget - len(state.computed_steps) - final_left


def should_compute(state: ALPWindowState, x: torch.Tensor, step_index: int) -> tuple[bool, float]:
    """Decide one step: (compute the model?, error estimate this step adds if skipped). Pure."""
    cfg = state.config
    steps = state.steps
    if not 0 <= step_index < steps:
        raise ValueError(f"step_index must be in [0, {steps}), got {step_index}")
    if (not cfg.enabled or step_index < cfg.warmup_steps or step_index >= steps - cfg.final_steps
            or not state.history_velocities):
        return True, 0.0
    free = _free_budget(state, step_index)
    if free <= 0:
        return False, 0.0
    # Budget pacing: leave room for the remaining computed steps.
    sigma_end = state.sigmas[max(0, steps - cfg.final_steps)] if cfg.final_steps else 0.0
    spacing = cfg.pace * (state.sigma_at_compute - sigma_end) / (free + 1)
    too_early = state.sigma_at_compute - state.sigmas[step_index] < spacing
    scale = max(_rms(state.latent_at_compute), 1e-12)
    if len(state.history_velocities) == 1 or state.order_cap == 0:
        movement = _rms(x - state.latent_at_compute) / scale
        return (not too_early and movement > cfg.first_trust), 0.0
    _, top = forecast_increment(state, step_index)
    added = _rms(top) / scale if top is not None else 0.0
    return (not too_early and state.error_estimate + added > cfg.error_tolerance), added


def layer_change_ratio(block_changes: Sequence[float]) -> float:
    """Deep-over-shallow ratio of per-block relative output changes (blocks ordered shallow to deep).

    The mean of the deepest third over the mean of the shallowest third (at least one block each).
    """
    changes = [float(c) for c in block_changes]
    if len(changes) < 2:
        raise ValueError(f"block_changes needs at least 2 blocks (shallow and deep), got {len(changes)}")
    if any(c < 0 or not math.isfinite(c) for c in changes):
        raise ValueError(f"block_changes must be finite and non-negative, got {changes}")
    third = max(1, len(changes) // 3)
    shallow = sum(changes[:third]) / third
    deep = sum(changes[-third:]) / third
    return deep / max(shallow, 1e-12)


def block_change_magnitudes(previous: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> list[float]:
    """Relative change ||b_now - b_prev|| / ||b_prev|| of each block's output between two computed steps."""
    if len(previous) != len(current):
        raise ValueError(f"previous and current block outputs differ in count: {len(previous)} vs {len(current)}")
    return [_rms(c - p) / max(_rms(p), 1e-12) for p, c in zip(previous, current)]


def _apply_layer_dial(state: ALPWindowState, block_changes: Sequence[float] | None) -> None:
    state.top_term_scale = 1.0
    state.order_cap = state.config.max_order
    if block_changes is None:
        return
    ratio = layer_change_ratio(block_changes)
    state.layer_ratios.append(ratio)
    limit = state.config.layer_ratio_limit
    if ratio > 2.0 * limit:
        state.order_cap = max(0, state.config.max_order - 1)
    elif ratio > limit:
        state.top_term_scale = limit / ratio


def record_computed(state: ALPWindowState, step_index: int, x: torch.Tensor, velocity: torch.Tensor,
                    block_changes: Sequence[float] | None = None) -> None:
    """Store a computed velocity (and optional per-block changes for Dial 2); resets the error estimate."""
    keep = state.config.max_order + 1
    state.history_sigmas = (state.history_sigmas + [state.sigmas[step_index]])[-keep:]
    state.history_velocities = (state.history_velocities + [_forecast_precision(velocity.detach())])[-keep:]
    # A copy: a sampler may write its blended latent in place into the tensor it passed in.
    state.latent_at_compute = x.detach().clone()
    state.sigma_at_compute = state.sigmas[step_index]
    state.error_estimate = 0.0
    state.computed_steps.append(step_index)
    _apply_layer_dial(state, block_changes)


def alp_step(state: ALPWindowState, x: torch.Tensor, step_index: int, velocity_fn: VelocityFn,
             block_changes_fn: Callable[[], Sequence[float] | None] | None = None) -> tuple[torch.Tensor, bool]:
    """Advance one window by one step: x at sigmas[i] -> x at sigmas[i + 1]. Returns (x_next, computed).

    ``block_changes_fn`` (Dial 2) is called right after a computed model pass and returns the per-block
    relative output changes measured during that pass (e.g. with ``block_change_magnitudes`` on
    outputs captured by the host's per-block hook), or None when there is nothing to compare yet.
    """
    s_now, s_next = state.sigmas[step_index], state.sigmas[step_index + 1]
    compute, added = should_compute(state, x, step_index)
    if compute:
        velocity = velocity_fn(x, s_now)
        block_changes = block_changes_fn() if block_changes_fn is not None else None
        record_computed(state, step_index, x, velocity, block_changes)
        return x + (s_next - s_now) * velocity, True
    increment, _ = forecast_increment(state, step_index)
    state.error_estimate += added
    state.skipped_steps.append(step_index)
    return x + increment.to(x.dtype), False


def report_lines(states: Sequence[ALPWindowState]) -> list[str]:
    """One line per window (model passes computed / skipped) and a total, for the sampler's report."""
    lines = []
    for index, state in enumerate(states):
        r = state.report()
        lines.append(f"window {index + 1}: {r['computed']} computed, {r['skipped']} skipped")
    computed = sum(len(s.computed_steps) for s in states)
    total = sum(s.steps for s in states)
    if total:
        lines.append(f"total: {computed} of {total} steps computed ({total / max(computed, 1):.2f}x fewer model passes)")
    return lines


def sample_alp(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
               config: ALPConfig) -> tuple[torch.Tensor, ALPWindowState]:
    """Run one window through every step of ``sigmas`` with ALP; returns the result and its state."""
    state = new_window_state(sigmas, config)
    for i in range(state.steps):
        x, _ = alp_step(state, x, i, velocity_fn)
    return x, state
