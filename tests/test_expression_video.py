"""Decoding driving videos with PyAV."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashportrait_core.expression import VideoReadError, read_video_frames

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"


def test_reads_whole_video_in_image_layout() -> None:
    frames, fps = read_video_frames(DRIVING / "lp_d0.mp4")
    assert frames.shape == (78, 512, 512, 3)
    assert frames.dtype == torch.float32
    assert fps == 25.0
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert frames.std() > 0.1  # real picture content, not a blank decode


def test_max_frames_and_other_rates() -> None:
    frames, fps = read_video_frames(str(DRIVING / "lp_s20.mp4"), max_frames=7)
    assert frames.shape == (7, 908, 480, 3)
    assert fps == pytest.approx(30.0)
    first, _ = read_video_frames(DRIVING / "lp_s20.mp4", max_frames=1)
    assert torch.equal(first[0], frames[0])
    with pytest.raises(ValueError, match="max_frames"):
        read_video_frames(DRIVING / "lp_s20.mp4", max_frames=0)


def test_clear_errors_for_unusable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video_frames(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty file"):
        read_video_frames(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video " * 200)
    with pytest.raises(VideoReadError, match="cannot decode"):
        read_video_frames(garbage)
    # Cut before the index: the container cannot be opened.
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((DRIVING / "lp_d0.mp4").read_bytes()[:4096])
    with pytest.raises(VideoReadError):
        read_video_frames(truncated)
    assert issubclass(VideoReadError, ValueError)
