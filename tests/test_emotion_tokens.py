"""Per-latent-frame split of emotion tokens."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.conditioning.emotion_tokens import (
    emotion_tokens_per_latent_frame,
    latent_frame_real_token_counts,
    latent_frame_token_ranges,
    num_latent_frames,
    tokens_per_latent_frame,
    trim_to_4k_plus_1,
)


def published_ranges(num_tokens: int, num_frames: int) -> list[tuple[int, int]]:
    """Step-by-step restatement of the published range rule (centre of each group of 4 frames)."""
    per_frame = num_tokens / num_frames
    half = int(per_frame * 4 / 2)
    centres = [0]
    for f in range(1, (num_frames - 1) // 4 + 1):
        first_token = per_frame * ((f - 1) * 4 + 1)
        end_token = per_frame * (f * 4 + 1)
        centres.append(int((first_token + end_token) / 2) - 1)
    ranges = [(c - half, c + half) for c in centres]
    ranges[0] = (-(2 * half - ranges[1][0]), ranges[1][0])
    return ranges


def published_windows(flat: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Slice-and-append-zeros restatement of the published padding, one window at a time."""
    last_valid = flat.shape[0] - 1
    windows = []
    for start, end in ranges:
        pad = max(-start, 0) + max(end - last_valid, 0)
        real = flat[max(start, 0):min(end, last_valid) + 1]
        windows.append(torch.cat([real, flat.new_zeros(pad, flat.shape[1])]))
    return torch.stack(windows)


def test_ranges_for_nine_frames_match_the_published_split():
    assert latent_frame_token_ranges(9) == [(-73, 23), (23, 119), (119, 215)]


@pytest.mark.parametrize("tokens_per_frame", [1, 3, 24])
@pytest.mark.parametrize("num_frames", [5, 9, 13, 81, 201, 1001])
def test_closed_form_ranges_equal_the_published_rule(num_frames, tokens_per_frame):
    expected = published_ranges(num_frames * tokens_per_frame, num_frames)
    assert latent_frame_token_ranges(num_frames, tokens_per_frame) == expected


def test_single_frame_gets_latent_frame_zero_range():
    assert latent_frame_token_ranges(1) == [(-73, 23)]


def test_last_range_ends_on_last_token_and_width_is_97():
    for num_frames in (5, 201, 4001):
        ranges = latent_frame_token_ranges(num_frames)
        assert ranges[-1][1] == num_frames * 24 - 1
        assert {end - start + 1 for start, end in ranges} == {97}
    assert tokens_per_latent_frame(24) == 97


def test_nine_frame_layout_real_tokens_then_zero_padding():
    frame_tokens = torch.randn(9, 24, 16)
    flat = frame_tokens.reshape(216, 16)
    windows = emotion_tokens_per_latent_frame(frame_tokens)
    assert windows.shape == (3, 97, 16)
    # Latent frame 0: frame 0's 24 tokens, then 73 exact zeros.
    torch.testing.assert_close(windows[0, :24], frame_tokens[0], rtol=0, atol=0)
    assert torch.count_nonzero(windows[0, 24:]) == 0
    torch.testing.assert_close(windows[1], flat[23:120], rtol=0, atol=0)
    torch.testing.assert_close(windows[2], flat[119:216], rtol=0, atol=0)
    assert latent_frame_real_token_counts(9).tolist() == [24, 97, 97]


@pytest.mark.parametrize("num_frames", [1, 5, 201])
def test_shapes_and_agreement_with_published_windows(num_frames):
    frame_tokens = torch.randn(num_frames, 24, 8, dtype=torch.float64)
    windows = emotion_tokens_per_latent_frame(frame_tokens)
    num_latent = (num_frames - 1) // 4 + 1
    assert windows.shape == (num_latent, 97, 8)
    assert windows.dtype == torch.float64
    ranges = latent_frame_token_ranges(num_frames)
    torch.testing.assert_close(windows, published_windows(frame_tokens.reshape(-1, 8), ranges), rtol=0, atol=0)


def test_batched_input_matches_per_sample():
    frame_tokens = torch.randn(2, 13, 24, 4)
    windows = emotion_tokens_per_latent_frame(frame_tokens)
    assert windows.shape == (2, 4, 97, 4)
    for b in range(2):
        torch.testing.assert_close(windows[b], emotion_tokens_per_latent_frame(frame_tokens[b]), rtol=0, atol=0)


def test_bad_frame_count_names_the_fix():
    with pytest.raises(ValueError, match="trim to 9 frames"):
        emotion_tokens_per_latent_frame(torch.zeros(10, 24, 4))
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_frame_token_ranges(8)
    with pytest.raises(ValueError):
        emotion_tokens_per_latent_frame(torch.zeros(24, 4))


def test_trim_to_4k_plus_1():
    assert [trim_to_4k_plus_1(n) for n in (1, 2, 4, 5, 8, 9, 202, 204, 205)] == [1, 1, 1, 5, 5, 9, 201, 201, 205]
    assert num_latent_frames(201) == 51
    with pytest.raises(ValueError):
        trim_to_4k_plus_1(0)


def test_long_video_is_one_gather():
    # 4001 frames x 24 tokens: a Python loop over tokens would take seconds; the gather takes milliseconds.
    frame_tokens = torch.arange(4001 * 24, dtype=torch.float32).reshape(4001, 24, 1)
    windows = emotion_tokens_per_latent_frame(frame_tokens)
    assert windows.shape == (1001, 97, 1)
    # Window f >= 1 is the consecutive run of token ids 96f-73 .. 96f+23.
    f = torch.arange(1, 1001)
    expected = (96 * f - 73)[:, None] + torch.arange(97)[None, :]
    torch.testing.assert_close(windows[1:, :, 0], expected.float(), rtol=0, atol=0)
