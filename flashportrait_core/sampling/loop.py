"""The sliding-window denoising loop over a noise schedule."""
from __future__ import annotations

from typing import Callable

import torch

from .solvers import StepHistory, make_step_update
from .windows import WindowPlan, blend_weights


# (x_window, sigma, window_index, step_index) -> guided velocity dx/dsigma of that window
WindowVelocity = Callable[[torch.Tensor, float, int, int], torch.Tensor]
# (window_index, x_window) -> that window's prediction (a velocity, or denoised latents: anything linear in it)
WindowPrediction = Callable[[int, torch.Tensor], torch.Tensor]


def blend_windows(x: torch.Tensor, plan: WindowPlan, predict: WindowPrediction, weights: torch.Tensor,
                  frame_dim: int = 2, compute_device: torch.device | str | None = None,
                  first_window: int = 0, blended: torch.Tensor | None = None,
                  after_window: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The windows' predictions of one step blended into one prediction of the whole video.

    ``weights`` [windows, frames] from ``windows.blend_weights`` (the published cross-fade, or the overwrite of the
    first step); the result is sum_k weights[k] * predict(k, x[window k]). The full latents and the accumulator stay
    on ``x``'s device; with ``compute_device`` each window's slice is copied there for ``predict`` and its
    prediction copied back, so the compute device holds one window at a time (copies are exact, the blend
    elementwise). ``first_window`` and ``blended`` continue a step whose earlier windows are already summed in
    ``blended``; ``after_window(k, blended)`` sees the sum after each window (a per-window checkpoint).
    """
    compute = x.device if compute_device is None else torch.device(compute_device)
    weights = weights.to(device=x.device, dtype=torch.float32)
    blended = torch.zeros_like(x, dtype=torch.float32) if blended is None else blended
    view_shape = [1] * x.ndim
    for k in range(first_window, len(plan.windows)):
        start, end = plan.windows[k]
        window_x = x.narrow(frame_dim, start, end - start).to(compute)  # a view when nothing moves
        prediction = predict(k, window_x)
        del window_x  # the compute device holds one window's latents at a time
        view_shape[frame_dim] = end - start
        w = weights[k, start:end].reshape(view_shape)
        blended.narrow(frame_dim, start, end - start).add_(prediction.to(device=x.device, dtype=torch.float32) * w)
        del prediction
        if after_window is not None:
            after_window(k, blended)
    return blended


def sample_flow_windows(
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    plan: WindowPlan,
    velocity: WindowVelocity,
    on_step: Callable[[int, int], None] | None = None,
    frame_dim: int = 2,
    solver: str = "euler",
    *,
    compute_device: torch.device | str | None = None,
    start_step: int = 0,
    after_step: Callable[[int, torch.Tensor], None] | None = None,
    step_history: StepHistory | None = None,
) -> torch.Tensor:
    """Flow-matching Euler over overlapping context windows; returns the clean latents.

    Each step every window predicts a velocity for its slice of the current latents; the predictions are
    blended with the published cross-fade (an overwrite at step 0) and one Euler step moves all frames.
    Blending velocities and then stepping equals stepping each window and blending the results, because the
    Euler step is linear in the velocity. ``solver`` "adams2"/"adams3" steps with Adams-Bashforth over the
    blended velocities of the last steps instead (``solvers.make_step_update``), kept in ``step_history``
    (on the storage device); also linear.

    Bounded device memory: the full latents and the blend accumulator stay on ``noise``'s device (the storage
    device, e.g. the CPU). With ``compute_device`` set, each window's slice is copied there for ``velocity``
    and its prediction copied back, so the compute device holds one window at a time. Copies are exact and
    the blend is elementwise, so the result equals the loop run wholly on one device.

    Resuming: ``noise`` may instead be the latents after ``start_step`` completed steps; the loop continues
    from there, with the multistep ``step_history`` of those steps for the Adams solvers.
    ``after_step(completed_steps, latents)`` sees the latents (on the storage device) after every step, e.g. to
    write a checkpoint.
    """
    if noise.shape[frame_dim] != plan.num_frames:
        raise ValueError(f"latents have {noise.shape[frame_dim]} frames but the window plan covers "
                         f"{plan.num_frames}; plan the windows for this latent length")
    steps = len(sigmas) - 1
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}] (completed steps of a {steps}-step schedule), "
                         f"got {start_step}")
    x = noise.to(torch.float32)
    compute = x.device if compute_device is None else torch.device(compute_device)
    weight_table = {crossfade: blend_weights(plan, crossfade) for crossfade in (False, True)}
    step_update = make_step_update(solver, step_history)  # Euler, or multistep over blended velocities
    for step in range(start_step, steps):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        blended = blend_windows(x, plan, lambda k, window_x: velocity(window_x, sigma, k, step),
                                weight_table[step > 0], frame_dim, compute)
        x = x + step_update(sigma, sigma_next, blended)
        del blended  # only the latents are carried to the next step
        if on_step is not None:
            on_step(step + 1, steps)
        if after_step is not None:
            after_step(step + 1, x)
    return x
