"""The step-skipping baselines of the trained ALP testbed, in the sampler's window loop, on a closed-form velocity."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

from flashportrait_core.sampling.loop import sample_flow_windows  # noqa: E402
from flashportrait_core.sampling.schedules import published_sigmas  # noqa: E402
from flashportrait_core.sampling.windows import plan_windows  # noqa: E402
from window_caches import (EasyCacheRule, FixedPlanCache, MagCacheLike, TeaCacheLike, WindowedDenoiser,  # noqa: E402
                           flow_percent_to_sigma, spread_plan)

PLAN = plan_windows(12, 8, 4)
SIGMAS = published_sigmas(30, 5.0)


class CurvedGuided:
    """A smooth, x-dependent velocity standing in for the guided model; counts evaluations per window."""

    def __init__(self):
        self.plan = PLAN
        self.evaluations = [0] * len(PLAN.windows)
        self.sigmas: list[list[float]] = [[] for _ in PLAN.windows]
        self.last_posi = None

    def guided(self, x, sigma, window, probe=None):
        self.evaluations[window] += 1
        self.sigmas[window].append(float(sigma))
        v = torch.tanh(x) * (1.0 + sigma) - 0.3 * sigma ** 2 + 0.05 * window
        self.last_posi = v * 0.9
        return v

    def __call__(self, x, sigma, window, step):
        return self.guided(x, sigma, window)


def noise() -> torch.Tensor:
    return torch.randn(1, 3, 12, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run(make_cache):
    guided = CurvedGuided()
    cache = make_cache(guided)
    out = sample_flow_windows(noise(), SIGMAS, PLAN, cache)
    return out, guided, cache


def test_a_plan_of_every_step_is_the_plain_loop():
    full = sample_flow_windows(noise(), SIGMAS, PLAN, CurvedGuided())
    out, guided, _ = run(lambda g: FixedPlanCache(g, SIGMAS, frozenset(range(30)), order=2))
    torch.testing.assert_close(out, full, rtol=0, atol=0)
    assert guided.evaluations == [30, 30]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_fixed_plans_compute_exactly_their_steps(order):
    plan = spread_plan(30, 6, warmup=2, final=True)
    assert len(plan) == 6 and {0, 1, 29} <= plan
    _, guided, cache = run(lambda g: FixedPlanCache(g, SIGMAS, plan, order))
    assert cache.computed == [sorted(plan)] * 2 and guided.evaluations == [6, 6]


def test_taylor_forecast_is_exact_for_a_linear_trend():
    """Reused steps of order 1 extrapolate the last two computed outputs linearly in step index (with one
    computed output so far, they repeat it)."""

    class Linear(CurvedGuided):
        def guided(self, x, sigma, window, probe=None):
            self.evaluations[window] += 1
            step = SIGMAS.tolist().index(sigma)
            return torch.full_like(x, 0.1 * step)

    guided = Linear()
    cache = FixedPlanCache(guided, SIGMAS, frozenset({0, 2, 29}), order=1)
    x = torch.zeros(1, 3, 8, 2, 2)
    for step in range(8):
        v = cache(x, float(SIGMAS[step]), 0, step)
        expected = 0.0 if step == 1 else 0.1 * step
        torch.testing.assert_close(v, torch.full_like(x, expected), msg=f"step {step}")
    assert guided.evaluations[0] == 2


@pytest.mark.parametrize("budget", [5, 6, 8, 10])
def test_rules_never_pass_their_budget(budget):
    ratios = [1.0] + [0.97] * 29
    embed = lambda s: torch.tensor([s, s * s, 1.0])  # noqa: E731
    makers = [
        lambda g: TeaCacheLike(g, SIGMAS, budget, 1e-6, embed),
        lambda g: MagCacheLike(g, SIGMAS, budget, 1e-6, ratios, 1, 0.1),
        lambda g: EasyCacheRule(g, SIGMAS, budget, 1e-6, start_percent=0.0),
    ]
    for make in makers:
        _, guided, cache = run(make)
        assert max(guided.evaluations) == budget, type(cache).__name__
        assert all(29 in steps for steps in cache.computed)  # the last step is reserved


def test_a_larger_teacache_threshold_computes_fewer_steps():
    embed = lambda s: torch.tensor([s, 1.0 - s, 0.5])  # noqa: E731
    counts = [max(run(lambda g, t=t: TeaCacheLike(g, SIGMAS, 30, t, embed))[1].evaluations)
              for t in (0.01, 0.1, 0.5, 2.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] >= 2


def test_magcache_skips_at_most_k_steps_in_a_row():
    _, _, cache = run(lambda g: MagCacheLike(g, SIGMAS, 30, 10.0, [1.0] * 30, max_skips=2, retention=0.2))
    for steps in cache.computed:
        assert steps[:6] == list(range(6))  # 20 % of 30 retained
        assert max(b - a for a, b in zip(steps, steps[1:])) == 3  # two reused steps between computed ones


def test_easycache_forces_steps_outside_its_range_and_reuses_the_output_input_difference():
    rule = EasyCacheRule(CurvedGuided(), SIGMAS, 30, 0.1)  # the node's defaults: start 0.15, end 0.95
    start, end = flow_percent_to_sigma(0.15, 5.0), flow_percent_to_sigma(0.95, 5.0)
    assert start == pytest.approx(0.9659, abs=1e-4) and end == pytest.approx(0.2083, abs=1e-4)
    assert rule.forced == {i for i in range(30) if SIGMAS[i] > start or SIGMAS[i] <= end}
    guided = CurvedGuided()
    cache = EasyCacheRule(guided, SIGMAS, 30, 10.0, start_percent=0.0)
    x = noise()[:, :, :8]
    v0 = cache(x, float(SIGMAS[0]), 0, 0)
    v1 = cache(x + 0.01, float(SIGMAS[1]), 0, 1)  # second computed step: the rate is measured
    assert cache.computed[0] == [0, 1]
    reused = cache(x + 0.02, float(SIGMAS[2]), 0, 2)
    assert cache.computed[0] == [0, 1]
    torch.testing.assert_close(reused, (x + 0.02) + (v1 - (x + 0.01)))
    assert not torch.equal(v0, v1)


def test_windowed_denoiser_with_comfyui_euler_is_the_loops_euler():
    from inprocess_host import use_host_in_process

    use_host_in_process()
    import comfy.k_diffusion.sampling as kds

    loop_out = sample_flow_windows(noise(), SIGMAS, PLAN, CurvedGuided())  # the loop runs in float32
    guided = CurvedGuided()
    denoiser = WindowedDenoiser(guided, PLAN)
    comfy_out = kds.sample_euler(denoiser, noise().float(), SIGMAS.float(), disable=True)
    torch.testing.assert_close(comfy_out, loop_out, rtol=1e-5, atol=1e-5)
    assert denoiser.calls == 30 and guided.evaluations == [30, 30]
