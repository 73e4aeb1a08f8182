"""Flow-matching schedule and the sliding-window denoising loop."""
from __future__ import annotations

from typing import Callable

import torch

from .windows import WindowPlan, blend_weights


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted flow-matching noise levels, from 1 down to 0 (``steps + 1`` values, float64).

    sigma(t) = shift * t / (1 + (shift - 1) * t) over t evenly spaced in [1, 0]; shift > 1 spends
    more steps at high noise, where a video's layout and motion are decided.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


# (x_window, sigma, window_index, step_index) -> guided velocity dx/dsigma of that window
WindowVelocity = Callable[[torch.Tensor, float, int, int], torch.Tensor]


def sample_flow_windows(
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    plan: WindowPlan,
    velocity: WindowVelocity,
    on_step: Callable[[int, int], None] | None = None,
    frame_dim: int = 2,
) -> torch.Tensor:
    """Flow-matching Euler over overlapping context windows; returns the clean latents.

    Each step every window predicts a velocity for its slice of the current latents; the predictions are
    blended with the published cross-fade (an overwrite at step 0) and one Euler step moves all frames.
    Blending velocities and then stepping equals stepping each window and blending the results, because the
    Euler step is linear in the velocity.
    """
    if noise.shape[frame_dim] != plan.num_frames:
        raise ValueError(f"latents have {noise.shape[frame_dim]} frames but the window plan covers "
                         f"{plan.num_frames}; plan the windows for this latent length")
    x = noise.to(torch.float32)
    steps = len(sigmas) - 1
    weight_table = {crossfade: blend_weights(plan, crossfade).to(torch.float32) for crossfade in (False, True)}
    view_shape = [1] * x.ndim
    for step in range(steps):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        weights = weight_table[step > 0].to(x.device)
        blended = torch.zeros_like(x)
        for k, (start, end) in enumerate(plan.windows):
            window_v = velocity(x.narrow(frame_dim, start, end - start), sigma, k, step)
            view_shape[frame_dim] = end - start
            w = weights[k, start:end].reshape(view_shape)
            blended.narrow(frame_dim, start, end - start).add_(window_v.to(x.dtype) * w)
        x = x + (sigma_next - sigma) * blended
        if on_step is not None:
            on_step(step + 1, steps)
    return x
