"""Step-skipping baselines in the windowed sampler's loop, and ComfyUI's samplers over the same windows.

Each baseline is a ``WindowVelocity`` (``flashportrait_core.sampling.loop``): per context window and step it
either computes the guided velocity (all guided passes: one evaluation) or reuses/forecasts one, keeping its
own state per window as ALP does. All of them are capped at ``budget`` computed steps per window; the steps a
rule always computes are reserved out of that budget first.

The guided velocity they wrap provides ``plan`` (the window plan), ``guided(x, sigma, window)`` (one evaluation)
and ``last_posi`` (the conditioned pass of the last evaluation, which ComfyUI's EasyCache reads its statistics
from).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from flashportrait_core.sampling.windows import WindowPlan, blend_weights


class BudgetedCache:
    """Base: compute at forced steps and where the rule asks while budget is left, else reuse."""

    def __init__(self, guided, sigmas: Sequence[float], budget: int):
        self.guided = guided
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.budget = budget
        self.forced = frozenset(i for i in range(self.steps) if self.is_forced(i))
        if len(self.forced) > budget:
            raise ValueError(f"{type(self).__name__} always computes {len(self.forced)} steps, over budget {budget}")
        windows = len(guided.plan.windows)
        self.computed: list[list[int]] = [[] for _ in range(windows)]
        self.states = [self.new_state() for _ in range(windows)]

    # ---- what a rule defines
    def is_forced(self, step: int) -> bool:
        return step == 0

    def new_state(self) -> dict:
        return {}

    def observe(self, state: dict, x: torch.Tensor, step: int) -> None:
        """Called at every non-forced step before the decision (accumulators)."""

    def wants_compute(self, state: dict, x: torch.Tensor, step: int) -> bool:
        raise NotImplementedError

    def after_compute(self, state: dict, x: torch.Tensor, step: int, v: torch.Tensor) -> None:
        state["v"] = v

    def reuse(self, state: dict, x: torch.Tensor, step: int) -> torch.Tensor:
        return state["v"]

    # ---- the loop's WindowVelocity
    def free(self, window: int, step: int) -> int:
        reserved = sum(1 for j in self.forced if j > step)
        return self.budget - len(self.computed[window]) - reserved

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        state = self.states[window]
        compute = step in self.forced or "v" not in state
        if not compute:
            self.observe(state, x, step)
            compute = self.free(window, step) > 0 and self.wants_compute(state, x, step)
        if not compute:
            return self.reuse(state, x, step)
        v = self.guided.guided(x, sigma, window)
        self.computed[window].append(step)
        self.after_compute(state, x, step, v)
        return v


def spread_plan(steps: int, budget: int, warmup: int, final: bool) -> frozenset[int]:
    """Compute steps 0..warmup-1, the last step if ``final``, the rest evenly spread in step index between."""
    plan = set(range(min(warmup, budget)))
    if final and len(plan) < budget:
        plan.add(steps - 1)
    free = budget - len(plan)
    end = steps - 1 if final else steps
    for p in np.linspace(warmup - 1, end, free + 2)[1:-1]:
        plan.add(int(round(p)))
    return frozenset(plan)


class FixedPlanCache(BudgetedCache):
    """Compute at a fixed set of steps; elsewhere reuse the last v (order 0) or a Taylor forecast in step index
    (order 1, 2: derivatives by differences of computed outputs over their step distance, as TaylorSeer does)."""

    def __init__(self, guided, sigmas, plan: frozenset[int], order: int):
        self.plan, self.order = frozenset(plan), order
        super().__init__(guided, sigmas, len(self.plan | {0}))

    def is_forced(self, step: int) -> bool:
        return step == 0 or step in self.plan

    def wants_compute(self, state, x, step):
        return False

    def after_compute(self, state, x, step, v):
        factors = [v]
        if "last" in state:
            distance = step - state["last"]
            for k in range(min(self.order, len(state["factors"]))):
                factors.append((factors[k] - state["factors"][k]) / distance)
        state.update(v=v, factors=factors, last=step)

    def reuse(self, state, x, step):
        distance = step - state["last"]
        return sum(f * distance ** k / math.factorial(k) for k, f in enumerate(state["factors"]))


class TeaCacheLike(BudgetedCache):
    """TeaCache's rule as its Wan 2.1 port applies it: accumulate the relative L1 change of the timestep
    embedding the blocks are modulated with (``time_projection`` output) between consecutive steps; compute when
    the sum reaches ``threshold`` (then reset), reuse the last v otherwise; first and last step computed.
    (TeaCache also rescales the change with a polynomial fitted per model; here the threshold is tuned instead.)"""

    def __init__(self, guided, sigmas, budget: int, threshold: float, embedding: Callable[[float], torch.Tensor]):
        self.threshold = threshold
        grid = [float(s) for s in sigmas]
        emb = [embedding(s) for s in grid[:-1]]
        self.changes = [0.0] + [float((emb[i] - emb[i - 1]).abs().mean() / emb[i - 1].abs().mean())
                                for i in range(1, len(emb))]
        super().__init__(guided, sigmas, budget)

    def is_forced(self, step):
        return step == 0 or step == self.steps - 1

    def new_state(self):
        return {"accumulated": 0.0}

    def observe(self, state, x, step):
        state["accumulated"] += self.changes[step]

    def wants_compute(self, state, x, step):
        return state["accumulated"] >= self.threshold

    def after_compute(self, state, x, step, v):
        state.update(v=v, accumulated=0.0)


class MagCacheLike(BudgetedCache):
    """MagCache's rule: with calibrated magnitude ratios r_i = |v_i| / |v_{i-1}| of the full run, skipping
    accumulates ratio *= r_i, error += |1 - ratio|; reuse the last v while the error stays under ``threshold``
    and at most ``max_skips`` steps in a row; the first ``retention`` fraction of steps and the last step are
    computed. (MagCache reuses the blocks' residual; here the velocity, the closest a velocity-level loop has.)"""

    def __init__(self, guided, sigmas, budget: int, threshold: float, ratios: Sequence[float], max_skips: int,
                 retention: float):
        self.threshold, self.ratios, self.max_skips, self.retention = threshold, list(ratios), max_skips, retention
        super().__init__(guided, sigmas, budget)

    def is_forced(self, step):
        return step < max(1, round(self.retention * self.steps)) or step == self.steps - 1

    def new_state(self):
        return {"ratio": 1.0, "skips": 0, "error": 0.0}

    def observe(self, state, x, step):
        state["ratio"] *= self.ratios[step]
        state["skips"] += 1
        state["error"] += abs(1.0 - state["ratio"])

    def wants_compute(self, state, x, step):
        return not (state["error"] < self.threshold and state["skips"] <= self.max_skips)

    def after_compute(self, state, x, step, v):
        state.update(v=v, ratio=1.0, skips=0, error=0.0)


def flow_percent_to_sigma(percent: float, shift: float) -> float:
    """ComfyUI's ModelSamplingDiscreteFlow.percent_to_sigma (what EasyCache's start/end percents mean)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return shift * t / (1 + (shift - 1) * t)


class EasyCacheRule(BudgetedCache):
    """ComfyUI 0.3.75's EasyCache (comfy_extras/nodes_easycache.py), per window.

    Steps with sigma above start_sigma, or at/below end_sigma, are computed (and past the end the cache is not
    updated). In between, once a computed step has measured the transformation rate k = |dv| / |dx| (mean
    absolute changes of the conditioned pass's output and of the input, subsampled ``subsample``x spatially),
    every step adds k * |x - x_c| / |v_c| to a running sum; while it stays under ``threshold`` the step reuses
    the cached output-input difference, v = x + (v_c - x_c), else it computes and the sum restarts.
    """

    def __init__(self, guided, sigmas, budget: int, threshold: float, start_percent: float = 0.15,
                 end_percent: float = 0.95, subsample: int = 8, shift: float = 5.0):
        self.threshold = threshold
        self.start_sigma = flow_percent_to_sigma(start_percent, shift)
        self.end_sigma = flow_percent_to_sigma(end_percent, shift)
        self.sub = (..., slice(None, None, subsample), slice(None, None, subsample))
        super().__init__(guided, sigmas, budget)

    def _active(self, step):
        s = self.sigmas[step]
        return s <= self.start_sigma and s > self.end_sigma

    def is_forced(self, step):
        return step == 0 or not self._active(step)

    def new_state(self):
        return {"cumulative": 0.0}

    def observe(self, state, x, step):
        if "rate" in state and "x_prev" in state:
            change = float((x[self.sub] - state["x_prev"]).abs().mean())
            state["cumulative"] += state["rate"] * change / state["out_norm"]

    def wants_compute(self, state, x, step):
        return "rate" not in state or state["cumulative"] >= self.threshold

    def after_compute(self, state, x, step, v):
        if self.sigmas[step] <= self.end_sigma:
            state["v"] = v  # past the end: computed, nothing cached
            return
        state["cumulative"] = 0.0
        if self._active(step):
            posi = self.guided.last_posi
            if "x_prev" in state:
                input_change = float((x[self.sub] - state["x_prev"]).abs().mean())
                output_change = float((posi[self.sub] - state["out_prev"]).abs().mean())
                state["rate"] = output_change / max(input_change, 1e-12)
            state.update(x_prev=x[self.sub].clone(), out_prev=posi[self.sub].clone(),
                         out_norm=float(posi.abs().mean()))
        state.update(v=v, diff=v - x)

    def reuse(self, state, x, step):
        return x + state["diff"] if "diff" in state else state["v"]


class WindowedDenoiser:
    """The k-diffusion model interface (``model(x, sigma) -> denoised``) over a window plan, for ComfyUI's samplers.

    One call evaluates every window at ``sigma`` and blends their velocities as the sampler's loop does (the
    later window overwrites the overlap at the first call, cross-fades after); denoised = x - sigma * v, the
    relation of ComfyUI's flow models. ``calls`` counts evaluations.
    """

    def __init__(self, velocity, plan: WindowPlan, frame_dim: int = 2):
        self.velocity, self.plan, self.frame_dim = velocity, plan, frame_dim
        self.weights = {crossfade: blend_weights(plan, crossfade).float() for crossfade in (False, True)}
        self.calls = 0

    def blended_velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        weights = self.weights[self.calls > 0]
        blended = torch.zeros_like(x)
        shape = [1] * x.ndim
        for k, (start, end) in enumerate(self.plan.windows):
            v = self.velocity(x.narrow(self.frame_dim, start, end - start), sigma, k, self.calls)
            shape[self.frame_dim] = end - start
            blended.narrow(self.frame_dim, start, end - start).add_(v.to(x.dtype) * weights[k, start:end].reshape(shape))
        self.calls += 1
        return blended

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        s = float(sigma.flatten()[0])
        return x - s * self.blended_velocity(x, s)
