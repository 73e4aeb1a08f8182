"""Writing frames to a video file as they arrive, so a video of any length never sits in memory."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


class StreamingVideoWriter:
    """H.264 (yuv420p) MP4 written chunk by chunk; frames are [N, H, W, 3] floats in [0, 1].

    Use as a context manager; on an exception the partial file is removed, so no broken video is left
    behind under the final name.
    """

    def __init__(self, path: str | Path, fps: float, crf: int = 19, codec: str = "libx264") -> None:
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive number, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality), got {crf}")
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.codec = codec
        self.frames_written = 0
        self._container = None
        self._stream = None

    def __enter__(self) -> StreamingVideoWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(discard=exc_type is not None)

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"H.264 with 4:2:0 chroma needs even sides, got {width}x{height}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(self.codec, rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf)}

    def write(self, frames: torch.Tensor) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [N, H, W, 3], got {list(frames.shape)}")
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        elif (frames.shape[1], frames.shape[2]) != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size changed from {self._stream.width}x{self._stream.height} to "
                             f"{frames.shape[2]}x{frames.shape[1]}")
        pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        for frame in pixels:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            self._container.mux(self._stream.encode(video_frame))
        self.frames_written += len(pixels)

    def close(self, discard: bool = False) -> None:
        if self._container is not None:
            if not discard:
                self._container.mux(self._stream.encode())
            self._container.close()
            self._container = None
        if discard and self.path.exists():
            self.path.unlink()
