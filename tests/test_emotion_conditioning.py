"""Emotion tokens made per window from the features: equal to the whole-video tokens, memory flat in length."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashportrait_core.conditioning.emotion_conditioning import (
    EmotionConditioning,
    all_latent_tokens,
    build_emotion_conditioning,
    encode_all_frames,
    encode_latent_frame_range,
)
from flashportrait_core.conditioning.emotion_tokens import (
    emotion_tokens_for_latent_range,
    emotion_tokens_per_latent_frame,
    latent_frame_video_span,
)
from flashportrait_core.conditioning.portrait_encoder import load_portrait_encoder, random_portrait_encoder_state_dict
from flashportrait_core.sampling.resume import resume_key

NUM_FRAMES = 201  # 51 latent frames: several encoder batches of 32 frames


@pytest.fixture(scope="module")
def encoder():
    return load_portrait_encoder(random_portrait_encoder_state_dict(seed=5)).float()


@pytest.fixture(scope="module")
def features():
    return torch.randn(NUM_FRAMES, 554, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def whole_video(encoder, features):
    return emotion_tokens_per_latent_frame(encode_all_frames(encoder, features))


def test_video_frame_span_per_latent_range():
    assert latent_frame_video_span(0, 1, 9) == (0, 1)
    assert latent_frame_video_span(1, 2, 9) == (0, 5)  # the last token of frame 0, then frames 1..4
    assert latent_frame_video_span(2, 3, 9) == (4, 9)
    assert latent_frame_video_span(0, 3, 9) == (0, 9)
    assert latent_frame_video_span(10, 31, 201) == (36, 121)
    with pytest.raises(ValueError, match=r"\[2, 4\).*3 latent frames"):
        latent_frame_video_span(2, 4, 9)
    with pytest.raises(ValueError, match="non-empty"):
        latent_frame_video_span(1, 1, 9)


@pytest.mark.parametrize("num_frames", [1, 5, 9, 37])
def test_gather_from_a_span_equals_the_whole_video_gather(num_frames):
    frame_tokens = torch.randn(num_frames, 3, 4, generator=torch.Generator().manual_seed(num_frames))
    expected = emotion_tokens_per_latent_frame(frame_tokens)
    num_latent = expected.shape[0]
    for start in range(num_latent):
        for end in range(start + 1, num_latent + 1):
            first, stop = latent_frame_video_span(start, end, num_frames)
            got = emotion_tokens_for_latent_range(frame_tokens[first:stop], num_frames, start, end)
            assert torch.equal(got, expected[start:end]), (start, end)


def test_span_tokens_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match=r"\[5, tokens, dim\].*frames 0..4"):
        emotion_tokens_for_latent_range(torch.zeros(9, 3, 4), 9, 1, 2)


@pytest.mark.parametrize("start, end", [(0, 1), (0, 51), (50, 51), (0, 21), (1, 2), (7, 8), (10, 31), (30, 51),
                                        (8, 9), (9, 17)])
def test_encoded_window_equals_whole_video_tokens_bit_for_bit(encoder, features, whole_video, start, end):
    got = encode_latent_frame_range(encoder, features, start, end)
    assert got.shape == (end - start, 97, 64)
    assert torch.equal(got, whole_video[start:end])


def test_single_frame_video(encoder, features):
    one = features[:1]
    expected = emotion_tokens_per_latent_frame(encode_all_frames(encoder, one))
    got = encode_latent_frame_range(encoder, one, 0, 1)
    assert torch.equal(got, expected) and got.shape == (1, 97, 64)
    assert torch.count_nonzero(got[0, 24:]) == 0  # frame 0's 24 tokens, then 73 zeros


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_window_equals_whole_video_tokens(encoder, features, whole_video, data):
    start = data.draw(st.integers(0, 50))
    end = data.draw(st.integers(start + 1, 51))
    assert torch.equal(encode_latent_frame_range(encoder, features, start, end), whole_video[start:end])


def test_conditioning_keeps_features_and_the_encoder_not_tokens(encoder, features, whole_video):
    emotion = build_emotion_conditioning(encoder, torch.cat([features, features[:3]]), 0.5, 3.0, 1.0)
    assert emotion.num_video_frames == NUM_FRAMES and emotion.num_latent_frames == 51
    assert emotion.encoder is encoder and emotion.latent_tokens is None
    assert emotion.token_width == 64
    assert torch.equal(emotion.expression_features, features)
    assert torch.equal(emotion.latent_tokens_for(10, 31), whole_video[10:31])
    assert torch.equal(emotion.latent_tokens_for(10, 31), whole_video[10:31])  # the cached window
    assert torch.equal(emotion.latent_tokens_for(0, 16, device="cpu"), whole_video[:16])
    assert emotion.latent_tokens_for(3, 4).dtype == torch.float32
    assert torch.equal(all_latent_tokens(emotion), whole_video)
    with pytest.raises(ValueError, match=r"\[40, 52\).*51 latent frames"):
        emotion.latent_tokens_for(40, 52)


def test_precomputed_tokens_still_work(whole_video):
    emotion = EmotionConditioning(latent_tokens=whole_video, num_video_frames=NUM_FRAMES, ip_scale=1.0,
                                  emo_cfg=4.0, text_cfg=1.0)
    assert emotion.num_latent_frames == 51 and emotion.token_width == 64
    assert torch.equal(emotion.latent_tokens_for(5, 9), whole_video[5:9])
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


def test_window_cache_holds_one_window_and_encodes_only_new_frames(encoder, features, whole_video, monkeypatch):
    import flashportrait_core.conditioning.emotion_conditioning as module

    encoded_frames = []
    real_encode = module.encode_expression_features

    def counting_encode(encoder, frames, *args):
        encoded_frames.append(frames.shape[0])
        return real_encode(encoder, frames, *args)

    monkeypatch.setattr(module, "encode_expression_features", counting_encode)
    emotion = build_emotion_conditioning(encoder, features)
    assert torch.equal(emotion.latent_tokens_for(0, 21), whole_video[0:21])  # frames 0..80: batches 0-2
    assert sum(encoded_frames) == 96 and sorted(emotion._batch_cache) == [0, 1, 2]
    encoded_frames.clear()
    assert torch.equal(emotion.latent_tokens_for(11, 31), whole_video[11:31])  # frames 40..120: batches 1-3
    assert sum(encoded_frames) == 32 and sorted(emotion._batch_cache) == [1, 2, 3]
    encoded_frames.clear()
    assert torch.equal(emotion.latent_tokens_for(11, 31), whole_video[11:31])  # the same window: nothing new
    assert encoded_frames == []
    assert torch.equal(emotion.latent_tokens_for(40, 51), whole_video[40:51])  # frames 156..200: batches 4-6
    assert sorted(emotion._batch_cache) == [4, 5, 6] and encoded_frames == [32, 32, 9]
