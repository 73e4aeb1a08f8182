"""Window plan and cross-fade weights."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait_core.sampling.windows import blend_weights, plan_windows


def test_published_defaults_on_a_long_video():
    plan = plan_windows(num_frames=100, length=51, overlap=30)
    assert plan.windows == ((0, 51), (21, 72), (42, 93), (49, 100))
    assert plan.window_length == 51


def test_short_video_gets_one_window():
    assert plan_windows(13, 51, 30).windows == ((0, 13),)
    assert plan_windows(51, 51, 30).windows == ((0, 51),)


def test_last_window_is_aligned_to_the_end():
    plan = plan_windows(9, 5, 2)
    assert plan.windows == ((0, 5), (3, 8), (4, 9))


def test_crossfade_is_linear_over_the_overlap_with_the_previous_window():
    plan = plan_windows(8, 5, 3)  # windows (0,5), (2,7), (3,8)
    weights = blend_weights(plan)
    assert torch.allclose(weights.sum(0), torch.ones(8, dtype=torch.float64))
    # Window 1 ramps 0, 1/2, 1 over frames 2..4 against window 0, then window 2 ramps over frames 3..6.
    assert weights[1, 2].item() == 0.0
    assert weights[2, 3].item() == 0.0 and weights[2, 7].item() == 1.0
    ramp = torch.arange(4, dtype=torch.float64) / 3
    assert torch.allclose(weights[2, 3:7], ramp)
    # What window 2 leaves is what windows 0 and 1 had blended: (1 - ramp) times their weights.
    assert torch.allclose(weights[:2, 3:7].sum(0), 1 - ramp)


def test_first_step_overwrites_instead_of_blending():
    plan = plan_windows(9, 5, 2)
    weights = blend_weights(plan, crossfade=False)
    owner = weights.argmax(0)
    assert owner.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert set(weights.flatten().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("length, overlap", [(0, 0), (5, 5), (5, 7), (5, -1)])
def test_bad_settings_are_refused_with_the_fix(length, overlap):
    with pytest.raises(ValueError, match="window"):
        plan_windows(20, length, overlap)


@settings(max_examples=300, deadline=None)
@given(num_frames=st.integers(1, 400), length=st.integers(1, 80), overlap_fraction=st.floats(0, 0.99))
def test_any_valid_plan_covers_every_frame_and_blends_to_one(num_frames, length, overlap_fraction):
    overlap = min(length - 1, int(overlap_fraction * length))
    plan = plan_windows(num_frames, length, overlap)
    assert plan.windows[0][0] == 0 and plan.windows[-1][1] == num_frames
    for start, end in plan.windows:
        assert 0 <= start < end <= num_frames
        assert end - start == min(length, num_frames)  # every window has the full length
    starts = [s for s, _ in plan.windows]
    assert starts == sorted(set(starts))
    for (_, prev_end), (start, _) in zip(plan.windows, plan.windows[1:]):
        assert start <= prev_end  # no gap between consecutive windows
    for crossfade in (True, False):
        weights = blend_weights(plan, crossfade)
        assert torch.allclose(weights.sum(0), torch.ones(num_frames, dtype=torch.float64))
        assert (weights >= 0).all()
        for k, (start, end) in enumerate(plan.windows):  # no weight outside a window
            assert weights[k, :start].abs().sum() == 0 and weights[k, end:].abs().sum() == 0
