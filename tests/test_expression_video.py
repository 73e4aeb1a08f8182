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


class Source:
    """Numbered items made on demand; records how far production got and whether it was closed."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count, self.fail_at = count, fail_at
        self.made = 0
        self.closed = False

    def __iter__(self):
        try:
            for index in range(self.count):
                if index == self.fail_at:
                    raise OSError(f"item {index} is damaged")
                self.made += 1
                yield index
        finally:
            self.closed = True


def test_read_ahead_keeps_order_and_stays_at_most_depth_ahead() -> None:
    import time

    from flashportrait_core.expression.video import read_ahead

    source = Source(20)
    received, leads = [], []
    for item in read_ahead(source, depth=2):
        time.sleep(0.01)  # a slow consumer: the producer fills the queue and waits
        leads.append(source.made - item - 1)
        received.append(item)
    assert received == list(range(20))
    assert max(leads) <= 3 and max(leads) >= 2  # two waiting and one being made, at most; and it did read ahead
    assert source.closed


def test_read_ahead_raises_the_producers_error_after_the_good_items() -> None:
    from flashportrait_core.expression.video import read_ahead

    received = []
    with pytest.raises(OSError, match="item 3 is damaged"):
        for item in read_ahead(Source(10, fail_at=3)):
            received.append(item)
    assert received == [0, 1, 2]


def test_leaving_read_ahead_early_stops_the_producer_and_closes_the_source() -> None:
    import threading

    from flashportrait_core.expression.video import read_ahead

    source = Source(1000)
    for item in read_ahead(source, depth=1):
        if item == 2:
            break
    assert source.closed and source.made <= 5
    assert not [t for t in threading.enumerate() if t.name == "flashportrait-read-ahead"]
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(read_ahead(Source(1), depth=0))
