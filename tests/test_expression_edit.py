"""Performance edits on real extracted features (lp_d0, lp_d10 and fp_case1 through MediaPipe and PD-FGC)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flashportrait_core.conditioning.emotion_conditioning import build_emotion_conditioning
from flashportrait_core.conditioning.portrait_encoder import load_portrait_encoder, random_portrait_encoder_state_dict
from flashportrait_core.expression.edit import (COMPONENTS, FIRST_FRAME, LABELS, MEAN, NEUTRALS, REFERENCE,
                                                change_speed, combine, extension_index, lock_head_pose, loop,
                                                neutral_features, scale_components, trim)
from flashportrait_core.expression.resample import resample_expressions
from real_performances import DRIVING_FRAMES, TALKING_FRAMES, driving, reference_features, talking

OTHERS = {name: [other for other in COMPONENTS if other != name] for name in COMPONENTS}


def _part(features: torch.Tensor, name: str) -> torch.Tensor:
    return features[:, COMPONENTS[name]]


def test_the_components_tile_the_554_values() -> None:
    covered = torch.zeros(554, dtype=torch.int64)
    for part in COMPONENTS.values():
        covered[part] += 1
    assert covered.eq(1).all()
    assert [part.stop - part.start for part in COMPONENTS.values()] == [6, 6, 30, 512]


@pytest.mark.parametrize("neutral", NEUTRALS)
@pytest.mark.parametrize("name", list(COMPONENTS))
def test_strength_zero_holds_the_component_at_the_neutral_value(name: str, neutral: str) -> None:
    performance = driving()
    reference = reference_features() if neutral == REFERENCE else None
    held = scale_components(performance, {name: 0.0}, neutral, reference)
    expected = neutral_features(performance, neutral, reference)[COMPONENTS[name]]
    assert torch.equal(_part(held.features, name), expected.expand(DRIVING_FRAMES, -1))
    assert _part(performance.features, name).std(dim=0).max() > 0  # it did move before
    for other in OTHERS[name]:
        assert torch.equal(_part(held.features, other), _part(performance.features, other))
    strengths = ", ".join(f"{label} x{0 if other == name else 1}" for other, label in LABELS.items())
    assert held.edits == [f"strength {strengths} around the {neutral}"]


def test_neutral_values() -> None:
    performance = driving()
    assert torch.equal(neutral_features(performance, FIRST_FRAME), performance.features[0])
    torch.testing.assert_close(neutral_features(performance, MEAN), performance.features.mean(dim=0))
    assert torch.equal(neutral_features(performance, REFERENCE, reference_features()), reference_features())
    assert not torch.allclose(reference_features(), performance.features[0])  # another face, other features


def test_strength_one_is_the_identity_bit_for_bit() -> None:
    performance = driving()
    assert scale_components(performance, {name: 1.0 for name in COMPONENTS}) is performance
    edited = scale_components(performance, {"mouth": 1.7, "eyes": 1.0}, MEAN)
    for name in ("head_pose", "eyes", "emotion"):
        assert torch.equal(_part(edited.features, name), _part(performance.features, name))
    assert torch.equal(edited.points, performance.points) and performance.edits == []  # the input is left as it was


def test_strength_scales_the_motion_around_the_neutral() -> None:
    performance = driving()
    neutral = neutral_features(performance, MEAN)
    edited = scale_components(performance, {"emotion": 2.5, "head_pose": 0.5}, MEAN)
    for name, strength in (("emotion", 2.5), ("head_pose", 0.5)):
        deviation = _part(performance.features, name) - neutral[COMPONENTS[name]]
        torch.testing.assert_close(_part(edited.features, name) - neutral[COMPONENTS[name]], strength * deviation)


def test_pose_lock_equals_the_reference_pose() -> None:
    performance, reference = driving(), reference_features()
    locked = lock_head_pose(performance, reference)
    assert torch.equal(_part(locked.features, "head_pose"), reference[:6].expand(DRIVING_FRAMES, -1))
    assert torch.equal(locked.features[:, 6:], performance.features[:, 6:])
    assert locked.edits == ["head pose locked to the reference portrait"]


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_relative_motion_moves_the_reference_by_the_driving_deltas(strength: float) -> None:
    performance, reference = driving(), reference_features()
    moved = scale_components(performance, {name: strength for name in COMPONENTS}, reference=reference,
                             relative=True)
    assert torch.equal(moved.features[0], reference)  # frame 0: the reference's own expression
    deltas = performance.features - performance.features[0]
    torch.testing.assert_close(moved.features - reference, strength * deltas, atol=1e-5, rtol=1e-5)
    assert moved.edits[-1].startswith("relative motion onto the reference portrait (head pose x")


def test_relative_strength_zero_holds_the_reference() -> None:
    performance, reference = driving(), reference_features()
    moved = scale_components(performance, {"mouth": 0.0}, reference=reference, relative=True)
    assert torch.equal(_part(moved.features, "mouth"), reference[COMPONENTS["mouth"]].expand(DRIVING_FRAMES, -1))


def test_edits_that_need_the_reference_say_so() -> None:
    with pytest.raises(ValueError, match="neutral 'reference portrait' needs the reference portrait's features: "
                                         "connect reference_image and expression_model"):
        scale_components(driving(), {"mouth": 0.5}, REFERENCE)
    with pytest.raises(ValueError, match="relative motion .* connect reference_image and expression_model"):
        scale_components(driving(), {}, relative=True)
    with pytest.raises(ValueError, match="mouth strength must be between 0 and 10"):
        scale_components(driving(), {"mouth": -1.0})
    with pytest.raises(ValueError, match="unknown components \\['lips'\\]"):
        scale_components(driving(), {"lips": 2.0})
    with pytest.raises(ValueError, match="one frame of 554 values, got \\[12\\]"):
        lock_head_pose(driving(), torch.zeros(12))


def test_combination_takes_the_chosen_slices_at_the_first_performance_rate() -> None:
    first, second = driving(), talking()  # 25 fps and 30 fps
    assert (first.fps, second.fps) == (25.0, 30.0)
    combined, reconciled = combine(first, second, {"mouth": "second", "eyes": "second"}, "trim")
    converted = resample_expressions(second, 25.0)  # 6 frames at 30 fps span 5/30 s: 5 frames at 25 fps
    assert converted.features.shape[0] == 5 and combined.features.shape[0] == 5
    for name in ("mouth", "eyes"):
        assert torch.equal(_part(combined.features, name), _part(converted.features, name))
    for name in ("head_pose", "emotion"):
        assert torch.equal(_part(combined.features, name), _part(first.features[:5], name))
    assert torch.equal(combined.points, first.points[:5])  # the first performance's face track
    assert reconciled == f"lengths: first {DRIVING_FRAMES}, second 5 frames -> 5 (both cut to the shorter)"
    assert combined.edits == [f"eyes, mouth from lp_d10.mp4 (resampled from 30 to 25 fps ({TALKING_FRAMES} -> 5 "
                              f"frames)); {reconciled}"]


@pytest.mark.parametrize("lengths, expected_index, how", [
    ("loop", [0, 1, 2, 3, 4, 0, 1, 2], "the shorter one repeated from its start"),
    ("ping-pong", [0, 1, 2, 3, 4, 3, 2, 1], "the shorter one played forth and back"),
    ("hold", [0, 1, 2, 3, 4, 4, 4, 4], "the shorter one held at its last frame"),
])
def test_combination_brings_the_shorter_performance_to_the_longer_length(lengths: str, expected_index,
                                                                         how: str) -> None:
    first, second = driving(), resample_expressions(talking(), 25.0)
    combined, reconciled = combine(first, second, {"mouth": "second"}, lengths)
    assert combined.features.shape[0] == DRIVING_FRAMES
    assert torch.equal(_part(combined.features, "mouth"), _part(second.features[expected_index], "mouth"))
    assert torch.equal(combined.features[:, :42], first.features[:, :42])
    assert reconciled == f"lengths: first {DRIVING_FRAMES}, second 5 frames -> {DRIVING_FRAMES} ({how})"


def test_combination_offset_delays_or_advances_the_second() -> None:
    first, second = driving(), dataclasses.replace(driving(), source="second.mp4")
    delayed, _ = combine(first, second, {"emotion": "second"}, "hold", second_offset=3)
    index = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]  # the first frame held 3 frames, then the performance
    assert delayed.features.shape[0] == DRIVING_FRAMES + 3
    assert torch.equal(_part(delayed.features, "emotion"), _part(second.features[index], "emotion"))
    advanced, _ = combine(first, second, {"emotion": "second"}, "trim", second_offset=-2)
    assert torch.equal(_part(advanced.features, "emotion"), _part(second.features[2:], "emotion"))
    edited_second = scale_components(second, {"mouth": 0.5}, MEAN)
    combined, _ = combine(first, edited_second, {"mouth": "second"}, "trim", second_offset=2)
    assert combined.edits == ["mouth from second.mp4 (delayed by 2 frames); its edits: strength head pose x1, eyes "
                              "x1, emotion x1, mouth x0.5 around the driving mean; lengths: first 8, second 10 frames "
                              "-> 8 (both cut to the shorter)"]
    with pytest.raises(ValueError, match="second_offset -8 drops all 8 frames"):
        combine(first, second, {"emotion": "second"}, "trim", second_offset=-8)


def test_combination_found_flags_need_both() -> None:
    first = driving()
    second = dataclasses.replace(first, found=torch.tensor([True, False] * (DRIVING_FRAMES // 2)))
    combined, _ = combine(first, second, {"mouth": "second"})
    assert combined.found.tolist() == second.found.tolist() and combined.filled_frames == [1, 3, 5, 7]
    nothing, message = combine(first, second, {"mouth": "first"})
    assert nothing is first and "nothing taken" in message


def test_trim_speed_and_loop() -> None:
    performance = driving()
    trimmed = trim(performance, 2, 4)
    assert torch.equal(trimmed.features, performance.features[2:6]) and torch.equal(trimmed.points,
                                                                                    performance.points[2:6])
    assert trimmed.edits == ["trimmed to frames 2..5 of 8"] and trimmed.source_frames == 4
    assert trim(performance) is performance
    with pytest.raises(ValueError, match="start_frame 8 is past the end of the performance \\(8 frames, 0..7\\)"):
        trim(performance, 8)
    # Twice as fast: every second frame (positions 0, 2, 4, 6); half as fast: linear interpolation between them.
    fast = change_speed(performance, 2.0)
    assert torch.equal(fast.features, performance.features[[0, 2, 4, 6]]) and fast.fps == performance.fps
    slow = change_speed(performance, 0.5)
    assert slow.features.shape[0] == 15
    torch.testing.assert_close(slow.features[1], (performance.features[0] + performance.features[1]) / 2)
    assert slow.edits == ["speed x0.5: 8 -> 15 frames"]
    looped = loop(trim(performance, 0, 3), 9, "ping-pong")
    assert torch.equal(looped.features, performance.features[[0, 1, 2, 1, 0, 1, 2, 1, 0]])
    assert loop(trim(performance, 0, 3), 7, "repeat").features.shape[0] == 7
    assert extension_index(1, 4, "ping-pong").tolist() == [0, 0, 0, 0]


def test_edited_performances_go_to_the_emotion_conditioning_unchanged() -> None:
    encoder = load_portrait_encoder(random_portrait_encoder_state_dict(seed=3)).float()
    performance = driving()
    edited = scale_components(performance, {"mouth": 2.0, "head_pose": 0.0}, MEAN)
    plain = build_emotion_conditioning(encoder, performance.features[:5], 1.0, 4.0, 1.0)
    changed = build_emotion_conditioning(encoder, edited.features[:5], 1.0, 4.0, 1.0)
    same = build_emotion_conditioning(encoder, scale_components(performance, {}).features[:5], 1.0, 4.0, 1.0)
    assert changed.num_latent_frames == plain.num_latent_frames == 2
    assert not torch.equal(changed.window_tokens(0, 2), plain.window_tokens(0, 2))
    assert torch.equal(same.window_tokens(0, 2), plain.window_tokens(0, 2))
