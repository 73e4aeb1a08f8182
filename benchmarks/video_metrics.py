"""Fidelity of a sampled video against a reference sample: PSNR, SSIM and a temporal-consistency PSNR.

Videos are [B, C, T, H, W] (or [C, T, H, W]) in [-1, 1], compared after clamping to that range (what a viewer of
the decoded video sees). Every measure is a mean over the batch of per-video values, so a batch of one video and
the same video alone score the same.
"""
from __future__ import annotations

import math

import torch

PEAK = 2.0  # peak-to-peak of data in [-1, 1]


def _as_batch(video: torch.Tensor) -> torch.Tensor:
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5:
        raise ValueError(f"expected a video [B, C, T, H, W] or [C, T, H, W], got shape {tuple(video.shape)}")
    return video.double().clamp(-1.0, 1.0)


def _check_pair(video: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_batch(video), _as_batch(reference)
    if a.shape != b.shape:
        raise ValueError(f"video {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape")
    return a, b


def _psnr_from_mse(mse: torch.Tensor, peak: float) -> torch.Tensor:
    return 10.0 * torch.log10(peak * peak / mse.clamp_min(1e-20))


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over videos of 10 log10(peak^2 / MSE), peak-to-peak 2 (identical videos: 206 dB, the MSE floored at 1e-20)."""
    a, b = _check_pair(video, reference)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return float(_psnr_from_mse(mse, PEAK).mean())


def temporal_psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of the frame-to-frame differences x[t+1] - x[t] against the reference's (peak-to-peak 2).

    It scores the motion alone: a video with the reference's motion but a constant offset scores perfectly, one
    that flickers where the reference is steady scores low. Needs at least two frames.
    """
    a, b = _check_pair(video, reference)
    if a.shape[2] < 2:
        raise ValueError("temporal_psnr needs videos of at least 2 frames")
    da, db = a.diff(dim=2), b.diff(dim=2)
    mse = (da - db).pow(2).flatten(1).mean(1)
    return float(_psnr_from_mse(mse, PEAK).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(video: torch.Tensor, reference: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, data range 2) over channels, frames and
    videos. The window is 7 (not 11) because the testbed's frames are 32 pixels wide; it is clipped to the frame."""
    a, b = _check_pair(video, reference)
    n, c, t, h, w = a.shape
    size = min(window, h, w)
    kernel = _gaussian_window(size, sigma)[None, None]
    flat_a = a.permute(0, 2, 1, 3, 4).reshape(n * t * c, 1, h, w)
    flat_b = b.permute(0, 2, 1, 3, 4).reshape(n * t * c, 1, h, w)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(z, kernel)

    mu_a, mu_b = blur(flat_a), blur(flat_b)
    var_a = blur(flat_a * flat_a) - mu_a.pow(2)
    var_b = blur(flat_b * flat_b) - mu_b.pow(2)
    cov = blur(flat_a * flat_b) - mu_a * mu_b
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    per_video = index.reshape(n, -1).mean(1)
    return float(per_video.mean())


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
