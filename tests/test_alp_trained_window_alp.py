"""ALP in the trained testbed's window loop (``WindowALP``): the guider's per-window ALP, as a window velocity."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import alp_trained as at  # noqa: E402  (imports the in-process host)

alp = at.alp
SIGMAS = at.published(30)


class Curved:
    """A smooth x-dependent velocity per window; counts evaluations, ignores the block probe."""

    def __init__(self, plan):
        self.plan = plan
        self.evaluations = [0] * len(plan.windows)
        self.report = SimpleNamespace(alp_states=[])

    def guided(self, x, sigma, window, probe=None):
        self.evaluations[window] += 1
        return torch.tanh(x) * (1.0 + sigma) - 0.3 * sigma ** 2 + 0.05 * window

    def velocity(self, window: int):
        return lambda x, sigma: self.guided(x, sigma, window)


def noise(frames: int) -> torch.Tensor:
    return torch.randn(1, 3, frames, 4, 4, generator=torch.Generator().manual_seed(0))


def test_one_window_is_alp_on_that_window():
    plan = at.windows.plan_windows(8, 8, 0)
    config = alp.preset("fast")
    guided = Curved(plan)
    out = at.loop.sample_flow_windows(noise(8), SIGMAS, plan, at.WindowALP(guided, SIGMAS, config, num_blocks=6))
    alone, state = alp.sample_alp(Curved(plan).velocity(0), noise(8), SIGMAS, config)
    # The loop takes ALP's step back as a velocity and steps with it again: equal up to float32 rounding.
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    assert guided.evaluations == [len(state.computed_steps)] and len(state.computed_steps) <= 5
    assert guided.report.alp_states[0].computed_steps == state.computed_steps


def test_every_window_keeps_its_own_state_and_budget():
    config = alp.preset("balanced")
    guided = Curved(at.PLAN)
    at.loop.sample_flow_windows(noise(12), SIGMAS, at.PLAN, at.WindowALP(guided, SIGMAS, config, num_blocks=6))
    states = guided.report.alp_states
    assert len(states) == len(at.PLAN.windows) == 2 and states[0] is not states[1]
    for state, evaluations in zip(states, guided.evaluations):
        assert evaluations == len(state.computed_steps) <= alp.step_budget(30, config) == 8
        assert state.computed_steps[0] == 0 and state.computed_steps[-1] == 29
        assert len(state.computed_steps) + len(state.skipped_steps) == 30
