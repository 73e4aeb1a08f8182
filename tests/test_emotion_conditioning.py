"""Emotion tokens made per window from the features, as published: each window encodes its own frames and
splits them over its own length; memory flat in the video's length."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait_core.conditioning.emotion_conditioning import (
    EmotionConditioning,
    build_emotion_conditioning,
    encode_all_frames,
    encode_window_tokens,
    window_video_frames,
)
from flashportrait_core.conditioning.portrait_encoder import (encode_expression_features, load_portrait_encoder,
                                                             random_portrait_encoder_state_dict)
from flashportrait_core.sampling.resume import resume_key
from flashportrait_core.sampling.windows import plan_windows

NUM_FRAMES = 201  # 51 latent frames: several encoder batches of 32 frames


@pytest.fixture(scope="module")
def encoder():
    return load_portrait_encoder(random_portrait_encoder_state_dict(seed=5)).float()


@pytest.fixture(scope="module")
def features():
    return torch.randn(NUM_FRAMES, 554, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def frame_tokens(encoder, features):
    return encode_all_frames(encoder, features)


def published_window_tokens(encoder, features, start, end):
    """Oracle written from the published description: encode video frames 4s..4(e-1) in one batch, flatten
    them, and give local latent frame j the inclusive token range [4nj - 3n - 1, 4nj + n - 1], real tokens
    first, zero tokens for the positions before the clip appended after them."""
    clip = encode_expression_features(encoder, features[4 * start:4 * (end - 1) + 1], 10_000)
    n, dim = clip.shape[1], clip.shape[2]
    flat = clip.reshape(-1, dim)
    windows = []
    for j in range(end - start):
        first, last = 4 * n * j - 3 * n - 1, 4 * n * j + n - 1
        real = [flat[i] for i in range(first, last + 1) if 0 <= i < flat.shape[0]]
        zeros = [torch.zeros(dim)] * (last - first + 1 - len(real))
        windows.append(torch.stack(real + zeros))
    return torch.stack(windows)


def test_window_video_frames():
    assert window_video_frames(0, 1) == (0, 1)
    assert window_video_frames(0, 51) == (0, 201)
    assert window_video_frames(21, 72) == (84, 285)  # 4(e - s - 1) + 1 = 201 frames


@pytest.mark.parametrize("start, end", [(0, 1), (0, 51), (50, 51), (0, 21), (1, 2), (7, 8), (10, 31), (30, 51),
                                        (9, 17)])
def test_window_tokens_are_the_published_per_window_split(encoder, features, start, end):
    got = encode_window_tokens(encoder, features, start, end)
    assert got.shape == (end - start, 97, 64)
    assert torch.allclose(got, published_window_tokens(encoder, features, start, end), atol=1e-5, rtol=1e-5)


def test_every_window_starts_with_24_real_tokens_and_73_zeros(encoder, features):
    plan = plan_windows(51, 16, 6)
    assert len(plan.windows) >= 3
    for start, end in plan.windows:
        tokens = encode_window_tokens(encoder, features, start, end)
        real_rows = tokens.abs().sum(-1) != 0
        assert real_rows[0, :24].all() and not real_rows[0, 24:].any(), (start, end)  # local frame 0
        assert real_rows[1:].all(), (start, end)  # every later latent frame: 97 real tokens
        # Local frame 0 is the window's first video frame 4s alone (not the tail of the frame before).
        assert torch.allclose(tokens[0, :24], encode_expression_features(encoder, features[4 * start:4 * start + 1],
                                                                         1), atol=1e-5)


def test_single_frame_video(encoder, features):
    got = encode_window_tokens(encoder, features[:1], 0, 1)
    assert got.shape == (1, 97, 64)
    assert torch.count_nonzero(got[0, 24:]) == 0  # frame 0's 24 tokens, then 73 zeros


def test_overlapping_windows_see_the_same_frame_tokens(encoder, features, frame_tokens):
    """Frames are encoded on a fixed batch grid, so a frame's tokens do not depend on which window asks."""
    for start, end in [(0, 21), (10, 31), (30, 51)]:
        first, stop = window_video_frames(start, end)
        tokens = encode_window_tokens(encoder, features, start, end)
        assert torch.equal(tokens[1:, 1:97].reshape(-1, 64)[-(stop - first - 1) * 24:],
                           frame_tokens[first + 1:stop].reshape(-1, 64))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_window_matches_the_oracle(encoder, features, data):
    start = data.draw(st.integers(0, 50))
    end = data.draw(st.integers(start + 1, min(51, start + 12)))
    assert torch.allclose(encode_window_tokens(encoder, features, start, end),
                          published_window_tokens(encoder, features, start, end), atol=1e-5, rtol=1e-5)


def test_conditioning_keeps_features_and_the_encoder_not_tokens(encoder, features):
    emotion = build_emotion_conditioning(encoder, torch.cat([features, features[:3]]), 0.5, 3.0, 1.0)
    assert emotion.num_video_frames == NUM_FRAMES and emotion.num_latent_frames == 51
    assert emotion.encoder is encoder and emotion.latent_tokens is None
    assert emotion.token_width == 64
    assert torch.equal(emotion.expression_features, features)
    expected = encode_window_tokens(encoder, features, 10, 31)
    assert torch.equal(emotion.window_tokens(10, 31), expected)
    assert torch.equal(emotion.window_tokens(10, 31), expected)  # the cached window
    assert emotion.window_tokens(3, 4).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[40, 52\).*51 latent frames"):
        emotion.window_tokens(40, 52)


def test_precomputed_tokens_are_sliced_as_given():
    whole_video = torch.randn(51, 97, 64, generator=torch.Generator().manual_seed(3))
    emotion = EmotionConditioning(latent_tokens=whole_video, num_video_frames=NUM_FRAMES, ip_scale=1.0,
                                  emo_cfg=4.0, text_cfg=1.0)
    assert emotion.num_latent_frames == 51 and emotion.token_width == 64
    assert torch.equal(emotion.window_tokens(5, 9), whole_video[5:9])
    with pytest.raises(ValueError, match="does not match 51 latent frames"):
        EmotionConditioning(latent_tokens=whole_video, num_video_frames=9, ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0)
    with pytest.raises(ValueError, match="either expression_features and encoder, or precomputed"):
        EmotionConditioning(num_video_frames=9, ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0)


def test_bad_features_are_refused(encoder):
    with pytest.raises(ValueError, match="554"):
        build_emotion_conditioning(encoder, torch.zeros(9, 512))
    with pytest.raises(ValueError, match="NaN/Inf"):
        build_emotion_conditioning(encoder, torch.full((9, 554), float("nan")))


def test_resume_key_follows_features_settings_and_encoder_weights(encoder, features):
    def key(emotion):
        return resume_key(seed=1, emotion=emotion)

    base = build_emotion_conditioning(encoder, features)
    assert key(base) == key(build_emotion_conditioning(encoder, features.clone()))
    changed = features.clone()
    changed[100, 7] += 0.5
    assert key(base) != key(build_emotion_conditioning(encoder, changed))
    assert key(base) != key(build_emotion_conditioning(encoder, features, ip_scale=0.5))
    other = load_portrait_encoder(random_portrait_encoder_state_dict(seed=6)).float()
    assert key(base) != key(build_emotion_conditioning(other, features))


def test_window_cache_holds_one_window_and_encodes_only_new_frames(encoder, features, monkeypatch):
    import flashportrait_core.conditioning.emotion_conditioning as module

    encoded_frames = []
    real_encode = module.encode_expression_features

    def counting_encode(encoder, frames, *args):
        encoded_frames.append(frames.shape[0])
        return real_encode(encoder, frames, *args)

    monkeypatch.setattr(module, "encode_expression_features", counting_encode)
    emotion = build_emotion_conditioning(encoder, features)
    emotion.window_tokens(0, 21)  # frames 0..80: batches 0-2
    assert sum(encoded_frames) == 96 and sorted(emotion._batch_cache) == [0, 1, 2]
    encoded_frames.clear()
    emotion.window_tokens(11, 31)  # frames 44..120: batches 1-3
    assert sum(encoded_frames) == 32 and sorted(emotion._batch_cache) == [1, 2, 3]
    encoded_frames.clear()
    emotion.window_tokens(11, 31)  # the same window: nothing new
    assert encoded_frames == []
    emotion.window_tokens(40, 51)  # frames 160..200: batches 5-6
    assert sorted(emotion._batch_cache) == [5, 6] and encoded_frames == [32, 9]
