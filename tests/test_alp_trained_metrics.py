"""Video fidelity measures of the trained ALP testbed: PSNR, SSIM and the temporal PSNR."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from video_metrics import mean_and_spread, psnr, ssim, temporal_psnr  # noqa: E402


def video(seed: int, shape=(1, 3, 4, 16, 16)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8


def test_psnr_of_a_known_error():
    a = video(0)
    assert psnr(a + 0.1, a) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)  # 26.02 dB
    assert psnr(a, a) > 200


def test_psnr_is_the_mean_over_videos_of_each_videos_psnr():
    a, b = video(1), video(2)
    pair = psnr(torch.cat([a + 0.1, b + 0.02]), torch.cat([a, b]))
    assert pair == pytest.approx((psnr(a + 0.1, a) + psnr(b + 0.02, b)) / 2)
    assert psnr((a + 0.1)[0], a[0]) == pytest.approx(psnr(a + 0.1, a))  # [C, T, H, W] accepted


def test_values_are_clamped_to_the_display_range():
    a = video(3).clamp(-0.5, 0.5)
    outside = a.clone()
    outside[..., 0, 0] = 5.0  # shown as 1.0
    shown = a.clone()
    shown[..., 0, 0] = 1.0
    assert psnr(outside, a) == pytest.approx(psnr(shown, a))


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(video(0), video(0, (1, 3, 5, 16, 16)))
    with pytest.raises(ValueError, match="expected a video"):
        ssim(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))


def test_temporal_psnr_ignores_a_constant_offset_and_catches_flicker():
    a = video(4)
    assert temporal_psnr(a + 0.05, a) > 120  # float32 rounding of the offset only
    flicker = a.clone()
    flicker[:, :, 1::2] += 0.1  # every other frame brighter: each difference off by 0.1
    assert temporal_psnr(flicker, a) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)
    assert psnr(flicker, a) > temporal_psnr(flicker, a)  # half the frames are exact
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_psnr(a[:, :, :1], a[:, :, :1])


def test_ssim_matches_the_formula_on_a_single_window():
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(1, 1, 1, 7, 7, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    coords = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :]) / g.sum() ** 2
    x, y = a[0, 0, 0].double(), b[0, 0, 0].double()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.02 ** 2, 0.06 ** 2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim(b, a) == pytest.approx(float(expected), abs=1e-12)


def test_ssim_is_one_for_identical_videos_and_falls_with_noise():
    a = video(6)
    gen = torch.Generator().manual_seed(7)
    assert ssim(a, a) == pytest.approx(1.0)
    small = ssim(a + 0.02 * torch.randn(a.shape, generator=gen), a)
    large = ssim(a + 0.2 * torch.randn(a.shape, generator=gen), a)
    assert 1.0 > small > large > 0.0


def test_mean_and_spread():
    assert mean_and_spread([2.0]) == (2.0, 0.0)
    mean, spread = mean_and_spread([1.0, 2.0, 3.0])
    assert mean == 2.0 and spread == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_and_spread([])
