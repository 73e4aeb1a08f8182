"""Decoding driving videos to frames in the IMAGE layout ([T, H, W, 3] float in [0, 1])."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch

DEFAULT_FPS = 25.0


class VideoReadError(ValueError):
    """The file exists but holds no decodable video frames."""


def _stream_fps(stream: object) -> float:
    for attribute in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, attribute, None)
        if rate:
            value = float(Fraction(rate))
            if value > 0:
                return value
    return DEFAULT_FPS  # container without a usable rate; 25 is the model's native frame rate


def read_video_frames(path: str | os.PathLike[str], max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode a video file -> (frames [T, H, W, 3] float32 in [0, 1], fps), keeping at most `max_frames`."""
    import av

    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive number of frames or None, got {max_frames}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"driving video not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path!r} is an empty file (0 bytes), not a video")
    decoded: list[np.ndarray] = []
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path!r} has no video stream")
            stream = container.streams.video[0]
            fps = _stream_fps(stream)
            for frame in container.decode(stream):
                decoded.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(decoded) >= max_frames:
                    break
    except av.FFmpegError as error:
        if not decoded:
            raise VideoReadError(f"cannot decode {path!r} as a video: {error}") from error
        # A truncated file: keep the frames decoded before the damage.
    if not decoded:
        raise VideoReadError(f"{path!r} contains no video frames")
    frames = torch.from_numpy(np.stack(decoded))
    return frames.to(torch.float32).div_(255.0), fps
