"""The core window loop continued from a step, on a compute device, and resume checkpoints' files and keys."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.sampling.alp import alp_step, new_window_state, preset
from flashportrait_core.sampling.resume import (SamplingCheckpoint, checkpoint_path, load_checkpoint,
                                                restore_window_state, resume_key, save_checkpoint, window_state_dict)
from flashportrait_core.sampling.loop import sample_flow_windows
from flashportrait_core.sampling.schedules import simple_sigmas
from flashportrait_core.sampling.windows import plan_windows

STEPS = 8
PLAN = plan_windows(13, 5, 2)  # 4 windows over 13 latent frames


def _noise_and_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 13, 3, 3, generator=gen), torch.randn(1, 4, 13, 3, 3, generator=gen)


class ToyVelocity:
    """A deterministic, nonlinear stand-in for the model: flow toward a target plus a smooth distortion."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def model(self, x: torch.Tensor, sigma: float, window: int) -> torch.Tensor:
        target = self.target.narrow(2, 0, x.shape[2]).to(x.device)
        return (x - target) / sigma + 0.05 * torch.sin(3 * x) * (1 + window)

    def __call__(self, x, sigma, window, step):
        return self.model(x, sigma, window)


class ToyALPVelocity:
    """Adaptive Latent Prediction per window around ToyVelocity, as the sampler node wires it."""

    def __init__(self, base: ToyVelocity, sigmas: torch.Tensor, config):
        self.base = base
        self.states = [new_window_state(sigmas, config) for _ in PLAN.windows]

    def __call__(self, x, sigma, window, step):
        state = self.states[window]
        x_next, _ = alp_step(state, x, step, lambda latents, s: self.base.model(latents, s, window))
        return (x_next - x) / (state.sigmas[step + 1] - state.sigmas[step])


def _velocity(target, alp: bool, sigmas):
    base = ToyVelocity(target)
    return ToyALPVelocity(base, sigmas, preset("quality")) if alp else base


def test_start_step_and_after_step_continue_the_loop_exactly():
    noise, target = _noise_and_target()
    sigmas = simple_sigmas(STEPS, 3.0)
    seen = {}
    full = sample_flow_windows(noise, sigmas, PLAN, ToyVelocity(target),
                               after_step=lambda k, x: seen.setdefault(k, x.clone()))
    assert sorted(seen) == list(range(1, STEPS + 1))
    assert torch.equal(seen[STEPS], full)
    continued = sample_flow_windows(seen[3], sigmas, PLAN, ToyVelocity(target), start_step=3)
    assert torch.equal(continued, full)
    with pytest.raises(ValueError, match="start_step"):
        sample_flow_windows(noise, sigmas, PLAN, ToyVelocity(target), start_step=STEPS + 1)


def test_windows_reach_the_velocity_on_the_compute_device():
    noise, target = _noise_and_target()
    sigmas = simple_sigmas(3, 3.0)
    devices = []

    def velocity(x, sigma, window, step):
        devices.append(x.device)
        return ToyVelocity(target)(x, sigma, window, step)

    out = sample_flow_windows(noise, sigmas, PLAN, velocity, compute_device="cpu")
    assert devices == [torch.device("cpu")] * (3 * len(PLAN.windows))
    assert torch.equal(out, sample_flow_windows(noise, sigmas, PLAN, ToyVelocity(target)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare storage and compute")
@pytest.mark.parametrize("alp", [False, True])
def test_latents_on_the_host_equal_latents_on_the_device(alp):
    noise, target = _noise_and_target()
    sigmas = simple_sigmas(STEPS, 3.0)
    on_device = sample_flow_windows(noise.cuda(), sigmas, PLAN, _velocity(target.cuda(), alp, sigmas))
    on_host = sample_flow_windows(noise, sigmas, PLAN, _velocity(target.cuda(), alp, sigmas), compute_device="cuda")
    assert on_host.device.type == "cpu"
    assert torch.equal(on_host, on_device.cpu())


def test_resuming_without_the_alp_histories_would_differ():
    """The ALP state is part of what a checkpoint must carry: the latents alone give another result."""
    noise, target = _noise_and_target()
    sigmas = simple_sigmas(STEPS, 3.0)
    seen = {}
    uninterrupted = sample_flow_windows(noise, sigmas, PLAN, _velocity(target, True, sigmas),
                                        after_step=lambda k, x: seen.setdefault(k, x.clone()))
    forgetful = sample_flow_windows(seen[4], sigmas, PLAN, _velocity(target, True, sigmas), start_step=4)
    assert not torch.equal(forgetful, uninterrupted)


def test_checkpoint_round_trip_is_weights_only_loadable_and_keyed(tmp_path):
    noise, target = _noise_and_target()
    sigmas = simple_sigmas(STEPS, 3.0)
    velocity = _velocity(target, True, sigmas)
    sample_flow_windows(noise, sigmas, PLAN, velocity)
    state = velocity.states[1]
    key = resume_key(seed=1)
    file = checkpoint_path(tmp_path, key)
    save_checkpoint(file, key, SamplingCheckpoint(5, noise, [window_state_dict(state)], {"passes": [3, 4]}))
    assert torch.load(file, weights_only=True)["completed_steps"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [file.name]  # no temporary file left behind
    loaded = load_checkpoint(file, key)
    assert loaded.completed_steps == 5 and torch.equal(loaded.latents, noise)
    assert loaded.extra == {"passes": [3, 4]}
    fresh = new_window_state(sigmas, preset("quality"))
    restore_window_state(fresh, loaded.window_states[0])
    assert fresh.computed_steps == state.computed_steps and fresh.skipped_steps == state.skipped_steps
    assert all(torch.equal(a, b) for a, b in zip(fresh.history_velocities, state.history_velocities))
    assert torch.equal(fresh.latent_at_compute, state.latent_at_compute)
    assert load_checkpoint(file, resume_key(seed=2)) is None  # another run's file is never used
    file.write_bytes(b"damaged")
    assert load_checkpoint(file, key) is None


def test_resume_key_depends_on_every_part():
    tokens = torch.zeros(3, 97, 8)
    base = dict(seed=1, steps=30, shift=5.0, size=(64, 48), windows=PLAN.windows, tokens=tokens,
                alp=preset("quality"))
    key = resume_key(**base)
    assert key == resume_key(**dict(base, tokens=tokens.clone()))
    changed = [dict(base, seed=2), dict(base, steps=29), dict(base, shift=5.5), dict(base, size=(48, 64)),
               dict(base, windows=plan_windows(13, 5, 3).windows), dict(base, alp=preset("fast")),
               dict(base, tokens=tokens + torch.eye(1, 8)), dict(base, tokens=tokens.double())]
    assert len({resume_key(**parts) for parts in changed} | {key}) == len(changed) + 1
