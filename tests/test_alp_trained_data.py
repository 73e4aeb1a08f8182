"""The trained ALP testbed's data: the split by video, the clips, and the I2V condition the model sees."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import trained_dit as td  # noqa: E402


@pytest.fixture(scope="module")
def frame_counts() -> dict[str, torch.Tensor]:
    """Stand-in frame stacks with the real videos' frame counts (values encode video and frame index)."""
    counts = {"lp_d0.mp4": 78, "lp_d3.mp4": 354, "lp_d6.mp4": 1008, "lp_d10.mp4": 448, "lp_d11.mp4": 225,
              "lp_d12.mp4": 183, "lp_d14.mp4": 536, "lp_d18.mp4": 216, "lp_d19.mp4": 250, "lp_d20.mp4": 175}
    frames = {}
    for v, (name, n) in enumerate(counts.items()):
        stack = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
        stack[:, 0] = v
        stack[:, 1] = (torch.arange(n) % 256).view(n, 1, 1).to(torch.uint8)
        stack[:, 2] = (torch.arange(n) // 256).view(n, 1, 1).to(torch.uint8)
        frames[name] = stack
    return frames


def test_split_covers_every_video_once():
    td.check_split()
    assert sorted(sum(map(list, td.SPLIT.values()), [])) == sorted(td.VIDEOS)
    assert not set(td.SPLIT["report"]) & set(td.SPLIT["tuning"])


def test_split_check_names_a_video_in_two_roles():
    split = dict(td.SPLIT, tuning=td.SPLIT["tuning"] + ("lp_d19.mp4",))
    with pytest.raises(ValueError, match="lp_d19.mp4 is in both"):
        td.check_split(split)


def test_split_check_names_a_missing_video():
    split = dict(td.SPLIT, train=td.SPLIT["train"][1:])
    with pytest.raises(ValueError, match=r"missing \['lp_d0.mp4'\]"):
        td.check_split(split)


def test_clips_of_each_role_come_from_its_videos_only(frame_counts):
    by_role = {role: td.clip_index(frame_counts, role) for role in td.SPLIT}
    for role, clips in by_role.items():
        assert {video for video, _ in clips} == set(td.SPLIT[role])
    videos = [{video for video, _ in clips} for clips in by_role.values()]
    assert all(not a & b for i, a in enumerate(videos) for b in videos[i + 1:])
    # Every start whose 8 frames (every 2nd) fit: 2,565 training clips from 2,649 frames.
    assert len(by_role["train"]) == sum(len(frame_counts[v]) - 14 for v in td.SPLIT["train"]) == 2565


def test_clip_tensor_takes_every_second_frame_of_one_video(frame_counts):
    clips = [("lp_d6.mp4", 300), ("lp_d20.mp4", 0)]
    batch = td.clip_tensor(frame_counts, clips, clip_frames=8)
    assert batch.shape == (2, 3, 8, 4, 4)
    pixels = ((batch + 1.0) * 127.5).round().long()
    frame_index = pixels[:, 1, :, 0, 0] + 256 * pixels[:, 2, :, 0, 0]
    assert frame_index[0].tolist() == list(range(300, 316, 2))
    assert frame_index[1].tolist() == list(range(0, 16, 2))
    video = pixels[:, 0, :, 0, 0]
    assert (video[0] == td.VIDEOS.index("lp_d6.mp4")).all() and (video[1] == td.VIDEOS.index("lp_d20.mp4")).all()


def test_last_clip_of_a_video_ends_on_its_last_frame(frame_counts):
    name = "lp_d20.mp4"
    last = td.clip_starts(len(frame_counts[name]))[-1]
    assert last + (td.CLIP_FRAMES - 1) * td.FRAME_STRIDE == len(frame_counts[name]) - 1


def test_evaluation_clips_are_spread_and_deterministic(frame_counts):
    clips = td.evaluation_clips(frame_counts, "report", per_video=3, clip_frames=12)
    assert clips == td.evaluation_clips(frame_counts, "report", per_video=3, clip_frames=12)
    assert [video for video, _ in clips] == ["lp_d19.mp4"] * 3 + ["lp_d20.mp4"] * 3
    for video, start in clips:
        assert 0 < start and start + 11 * td.FRAME_STRIDE < len(frame_counts[video])
    starts = [start for video, start in clips if video == "lp_d19.mp4"]
    assert starts == sorted(starts) and len(set(starts)) == 3


def test_evaluation_clips_refuse_a_video_too_short(frame_counts):
    with pytest.raises(ValueError, match="lp_d19.mp4 holds"):
        td.evaluation_clips(frame_counts, "report", per_video=10_000, clip_frames=12)


def test_decoded_frames_are_the_real_video_downscaled():
    frames = td.decode_frames(td.DRIVING_DIR / "lp_d20.mp4")
    assert frames.shape == (175, 3, 32, 32) and frames.dtype == torch.uint8
    # A real face video: frames differ from each other, and no frame is flat.
    assert (frames[1:].float() - frames[:-1].float()).abs().mean() > 0.1
    assert frames.float().flatten(1).std(1).min() > 10


def test_condition_marks_the_first_frame_and_drops_whole_rows():
    gen = torch.Generator().manual_seed(0)
    reference = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    concat, context = td.condition_inputs(reference, frames=5, keep=torch.tensor([True, False]))
    assert concat.shape == (2, 7, 5, 8, 8) and context.shape == (2, 4, 3 * 16 + 16)
    assert (concat[0, 0, 0] == 1).all() and (concat[0, 0, 1:] == 0).all()
    torch.testing.assert_close(concat[0, 1:4, 0], reference[0])  # Wan's I2V form: frame 0 known
    assert (concat[0, 1:4, 1:] == 0).all()
    for frame in range(5):  # the identity at every frame
        torch.testing.assert_close(concat[0, 4:, frame], reference[0])
    assert (concat[1] == 0).all() and (context[1] == 0).all()
    # Context token 1 is the patch at row 0, column 1 (channel-major values), then its position features.
    torch.testing.assert_close(context[0, 1, :48], reference[0, :, 0:4, 4:8].reshape(-1))
    assert not torch.equal(context[0, 0, 48:], context[0, 1, 48:])


def test_training_batches_repeat_with_the_seed(frame_counts):
    clips = td.clip_index(frame_counts, "train")
    a = td.training_batch(frame_counts, clips, 4, torch.Generator().manual_seed(3))
    b = td.training_batch(frame_counts, clips, 4, torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    x0, noise, sigma, keep = a
    assert x0.shape == noise.shape == (4, 3, td.CLIP_FRAMES, 4, 4)
    assert ((0 <= sigma) & (sigma < 1)).all() and keep.dtype == torch.bool


def test_learning_rate_warms_up_then_decays_to_its_floor():
    config = td.TrainConfig(steps=200, schedule_steps=200, anneal_steps=0, warmup=20, lr=1e-3, final_lr_fraction=0.1)
    assert td.learning_rate(config, 0) == pytest.approx(5e-5)
    assert td.learning_rate(config, 19) == pytest.approx(1e-3)
    assert td.learning_rate(config, 20) == pytest.approx(1e-3)
    assert td.learning_rate(config, 199) == pytest.approx(1e-4, rel=1e-3)
    rates = [td.learning_rate(config, s) for s in range(20, 200)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_the_training_tag_changes_with_the_budget():
    assert td.TrainConfig().tag() == td.TrainConfig().tag()
    assert td.TrainConfig(steps=10).tag() != td.TrainConfig().tag()


def test_a_cut_schedule_follows_the_long_cosine_then_anneals_to_its_floor():
    long = td.TrainConfig(steps=900, schedule_steps=900, anneal_steps=0, warmup=50, lr=1e-3, final_lr_fraction=0.1)
    cut = td.TrainConfig(steps=700, schedule_steps=900, anneal_steps=100, warmup=50, lr=1e-3, final_lr_fraction=0.1)
    # The first 600 steps are the 900-step run's (a checkpoint of it resumes into the cut run).
    assert all(td.learning_rate(cut, s) == td.learning_rate(long, s) for s in range(600))
    # Cosine at step 600 of 900 (progress 550/850): 0.1 + 0.9 * (1 + cos(0.647 pi)) / 2 = 0.351 of the peak.
    assert td.learning_rate(cut, 599) == pytest.approx(3.51e-4, rel=1e-3)
    # Halfway down the linear fall from the cosine at step 600 (0.3494) to 0.1: 0.2247.
    assert td.learning_rate(cut, 649) == pytest.approx(2.247e-4, rel=1e-3)
    assert td.learning_rate(cut, 699) == pytest.approx(1e-4)
    rates = [td.learning_rate(cut, s) for s in range(50, 700)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
