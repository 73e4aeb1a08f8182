"""Decoding driving videos with PyAV: container facts, chunked decoding, whole-video reading.

Frames are turned upright by the container's display rotation (phone videos store portrait clips sideways) and
kept at the size of the first frame, so every chunk of one video has the same shape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

DEFAULT_FPS = 25.0
# Frame intervals spreading wider than this share of the median interval make a variable-frame-rate video
# (container timestamps rounded to a coarse time base stay well inside it).
VARIABLE_RATE_SPREAD = 0.2


class VideoReadError(ValueError):
    """The file exists but holds no decodable video frames."""


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (sizes after display rotation).

    frame_count: the container's frame count, or an estimate from its duration when it has none
    (`frame_count_exact` tells which); decoding may still yield fewer frames from a damaged file.
    """

    path: str
    width: int
    height: int
    fps: float
    frame_count: int
    frame_count_exact: bool
    rotation: int  # degrees counter-clockwise applied to decoded frames to show them upright


def _stream_fps(stream: object) -> float:
    for attribute in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attribute, None)
        if rate:
            value = float(Fraction(rate))
            if value > 0:
                return value
    return DEFAULT_FPS  # container without a usable rate; 25 is the model's native frame rate


def _check_file(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"driving video not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path!r} is an empty file (0 bytes), not a video")
    return path


def _open(path: str):  # -> av.container.InputContainer
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoReadError(f"cannot decode {path!r} as a video: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path!r} has no video frames (the container holds no video stream; an empty "
                             "recording or an audio-only file?)")
    return container


def _frame_count(container: object, stream: object, fps: float) -> tuple[int, bool]:
    if stream.frames and stream.frames > 0:
        return int(stream.frames), True
    if stream.duration and stream.time_base:
        return max(int(round(float(stream.duration * stream.time_base) * fps)), 0), False
    if container.duration:
        return max(int(round(container.duration / 1_000_000 * fps)), 0), False  # microseconds
    return 0, False


def _quarter_turns(rotation: float) -> int:
    """Display rotation (degrees counter-clockwise) -> np.rot90 quarter turns; other angles are ignored."""
    turns = rotation / 90.0
    if abs(turns - round(turns)) > 0.01:
        return 0
    return int(round(turns)) % 4


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Size, fps and frame count from the container, without decoding the whole video."""
    import av

    path = _check_file(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        count, exact = _frame_count(container, stream, fps)
        width, height = stream.codec_context.width, stream.codec_context.height
        rotation = 0
        try:
            first = next(container.decode(stream))
            rotation = _quarter_turns(getattr(first, "rotation", 0) or 0) * 90
            width, height = first.width, first.height
        except (StopIteration, av.FFmpegError):
            pass  # reported when decoding: a video without a decodable frame
    finally:
        container.close()
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(path=path, width=width, height=height, fps=fps, frame_count=count, frame_count_exact=exact,
                     rotation=rotation)


def frame_intervals(path: str | os.PathLike[str], max_frames: int | None = None) -> np.ndarray:
    """Seconds between consecutive frames (presentation order), from the packets' timestamps: the file is
    read without decoding. Empty when the container has fewer than two timed frames."""
    path = _check_file(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        times = [packet.pts for packet in container.demux(stream) if packet.pts is not None and packet.size]
        time_base = float(stream.time_base or 0)
    finally:
        container.close()
    times = np.sort(np.asarray(times, dtype=np.float64))[:max_frames]
    return np.diff(times) * time_base if time_base else np.zeros(0)


def variable_rate_note(path: str | os.PathLike[str], fps: float, max_frames: int | None = None) -> str | None:
    """A report line when the video's frames are not evenly spaced in time (None when they are).

    Its frames are still taken one after another at the container's average rate, as the published pipeline
    reads them; the line says so, since motion then plays faster or slower where the rate changed.
    """
    intervals = frame_intervals(path, max_frames)
    if intervals.size < 2:
        return None
    median = float(np.median(intervals))
    low, high = float(intervals.min()), float(intervals.max())
    if median <= 0 or (high - low) <= VARIABLE_RATE_SPREAD * median:
        return None
    return (f"variable frame rate: frames {low * 1000:.0f}-{high * 1000:.0f} ms apart; they are used in order at "
            f"the average {fps:g} fps (as published), so motion plays faster or slower where the rate changes; "
            f"to follow the timestamps, re-encode at a constant rate first (e.g. ffmpeg -i in.mp4 -vf fps=30 out.mp4)")


def iter_video_chunks(path: str | os.PathLike[str], chunk_size: int,
                      max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a video in order, yielding uint8 RGB chunks [B, H, W, 3] of at most `chunk_size` frames.

    Only one chunk is held at a time. A file damaged after some frames ends at the last good frame (as players
    do); a file with no decodable frame raises VideoReadError.
    """
    import av

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive number of frames or None, got {max_frames}")
    path = _check_file(path)
    container = _open(path)
    decoded = 0
    chunk: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: decoding stays far below the encoder's cost
        frames = container.decode(stream)
        while max_frames is None or decoded < max_frames:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.FFmpegError as error:
                if decoded == 0 and not chunk:
                    raise VideoReadError(f"cannot decode {path!r} as a video: {error}") from error
                break  # damaged after some frames: keep what decoded
            if size is None:
                size = (frame.width, frame.height)
            # Keep every frame at the first frame's size (streams may change resolution midway).
            image = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
            turns = _quarter_turns(getattr(frame, "rotation", 0) or 0)
            chunk.append(np.ascontiguousarray(np.rot90(image, turns)) if turns else image)
            decoded += 1
            if len(chunk) == chunk_size:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)
    finally:
        container.close()
    if decoded == 0:
        raise VideoReadError(f"{path!r} contains no video frames")


def read_video_frames(path: str | os.PathLike[str], max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode a video file -> (frames [T, H, W, 3] float32 in [0, 1], fps), keeping at most `max_frames`.

    Holds the whole video in memory; for long videos use `iter_video_chunks` (or extraction from the file).
    """
    info = probe_video(path)
    chunks = [torch.from_numpy(chunk) for chunk in iter_video_chunks(path, 64, max_frames)]
    return torch.cat(chunks).to(torch.float32).div_(255.0), info.fps
