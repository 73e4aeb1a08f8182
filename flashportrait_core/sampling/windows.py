"""Sliding context windows over latent frames and their blend weights.

Published scheme: windows of ``length`` latent frames start at 0 with stride ``length - overlap``; the last
window is moved back so that it ends exactly at the last frame. Each step the windows are visited in order and
a window's prediction is cross-faded linearly into what the earlier windows left in the overlap (new-window
weight j / (n - 1) over the n shared frames). At the first step the later window simply overwrites the overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowPlan:
    """Windows as half-open latent-frame ranges ``[start, end)`` over ``num_frames`` latent frames."""

    num_frames: int
    windows: tuple[tuple[int, int], ...]

    @property
    def window_length(self) -> int:
        return max(end - start for start, end in self.windows)


def plan_windows(num_frames: int, length: int, overlap: int) -> WindowPlan:
    """Plan windows of ``length`` latent frames sharing ``overlap`` frames with their predecessor.

    A video no longer than one window gets a single window covering it.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if length < 1:
        raise ValueError(f"window length must be at least 1 latent frame, got {length}")
    if not 0 <= overlap < length:
        raise ValueError(f"window overlap must be in [0, length - 1] = [0, {length - 1}], got {overlap}; "
                         f"lower the overlap or raise the window length")
    if num_frames <= length:
        return WindowPlan(num_frames, ((0, num_frames),))
    stride = length - overlap
    starts = list(range(0, num_frames - length, stride))
    starts.append(num_frames - length)  # the last window ends at the last frame
    return WindowPlan(num_frames, tuple((s, s + length) for s in starts))


def blend_weights(plan: WindowPlan, crossfade: bool = True) -> torch.Tensor:
    """Per-window weight of every latent frame, ``[num_windows, num_frames]`` (float64).

    Composes the sequential cross-fade (kept = (1 - a) * kept + a * new) into one weight per window and frame,
    so a blended quantity is ``sum_k weights[k] * value_k``. Every frame's weights sum to 1. With
    ``crossfade=False`` (the first step) a later window overwrites the overlap instead.
    """
    weights = torch.zeros(len(plan.windows), plan.num_frames, dtype=torch.float64)
    covered_until = 0
    for k, (start, end) in enumerate(plan.windows):
        new_weight = torch.ones(end - start, dtype=torch.float64)
        shared = max(0, min(covered_until, end) - start)
        if crossfade and shared > 1:
            new_weight[:shared] = torch.arange(shared, dtype=torch.float64) / (shared - 1)
        elif crossfade and shared == 1:
            new_weight[:1] = 0.0  # a single shared frame keeps the earlier window's value
        weights[:k, start:end] *= 1.0 - new_weight
        weights[k, start:end] = new_weight
        covered_until = max(covered_until, end)
    return weights
