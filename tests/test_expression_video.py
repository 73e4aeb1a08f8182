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


def write_variable_rate_video(path: Path, intervals_ms: list[int], images=None) -> None:
    """An H.264 file whose frames are the given milliseconds apart (a phone's variable frame rate): flat grey
    64x64 frames, or ``images`` [len(intervals_ms) + 1, H, W, 3] uint8."""
    from fractions import Fraction

    import av
    import numpy as np

    count = len(intervals_ms) + 1
    if images is None:
        images = np.stack([np.full((64, 64, 3), index * 8 % 256, np.uint8) for index in range(count)])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = images.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        time = 0
        for image, interval in zip(images, [*intervals_ms, 40]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            time += interval
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize("name", sorted(p.name for p in DRIVING.glob("*.mp4")))
def test_constant_rate_videos_have_no_timing_note(name: str) -> None:
    from flashportrait_core.expression.video import probe_video, variable_rate_note

    assert variable_rate_note(DRIVING / name, probe_video(DRIVING / name).fps) is None


def test_variable_rate_video_is_reported(tmp_path: Path) -> None:
    from flashportrait_core.expression.video import frame_intervals, probe_video, variable_rate_note

    path = tmp_path / "vfr.mp4"
    write_variable_rate_video(path, [40] * 15 + [20] * 14)
    assert frame_intervals(path).round(3).tolist() == [0.04] * 15 + [0.02] * 14
    fps = probe_video(path).fps
    note = variable_rate_note(path, fps)
    assert note.startswith(f"variable frame rate: frames 20-40 ms apart; they are used in order at the average "
                           f"{fps:g} fps (as published)")
    assert variable_rate_note(path, fps, max_frames=10) is None  # the first 10 frames are evenly spaced
