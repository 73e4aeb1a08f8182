"""Writing frames to a video file as they arrive, so a video of any length never sits in memory.

An audio track (the driving video's, from its file or as a waveform) can go along: it is read, re-encoded to
AAC and muxed in step with the frames, then cut at the video's last frame, so it is streamed too.
The file is created exclusively: an existing file is never replaced.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

AUDIO_CODEC = "aac"
AUDIO_BITRATE = 192_000
WAVEFORM_CHUNK_SECONDS = 1.0


@dataclass(frozen=True)
class AudioTrack:
    """Audio to mux: a media file's first audio stream, or a waveform ``[channels, samples]`` in [-1, 1].

    ``start_seconds`` of the source are skipped, so that the source time lines up with the first written frame
    (e.g. 1/fps when the reference frame is left out of the video).
    """

    file: str | Path | None = None
    waveform: torch.Tensor | None = None
    sample_rate: int | None = None
    start_seconds: float = 0.0

    def __post_init__(self) -> None:
        if (self.file is None) == (self.waveform is None):
            raise ValueError("an audio track takes exactly one source: a file or a waveform")
        if self.waveform is not None:
            if self.waveform.ndim != 2 or self.waveform.shape[0] < 1:
                raise ValueError(f"audio waveform must be [channels, samples], got {list(self.waveform.shape)}")
            if not self.sample_rate or self.sample_rate <= 0:
                raise ValueError(f"audio sample_rate must be a positive number, got {self.sample_rate}")
        if not math.isfinite(self.start_seconds) or self.start_seconds < 0:
            raise ValueError(f"audio start_seconds must be >= 0, got {self.start_seconds}")


def _open_audio_source(path: Path):  # -> av.container.InputContainer with at least one audio stream
    if path.is_dir():
        raise ValueError(f"audio source {path} is a folder, not a file; give a video or audio file with sound, "
                         f"e.g. the driving video")
    if not path.is_file():
        raise FileNotFoundError(f"audio source {path} does not exist; give the driving video's path")
    if path.stat().st_size == 0:
        raise ValueError(f"audio source {path.name} is an empty file (0 bytes); give a video or audio file with "
                         f"sound, e.g. the driving video")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"audio source {path.name} is not a video or audio file that can be read ({reason}); "
                         f"give a media file with sound, e.g. the driving video") from None
    if not container.streams.audio:
        container.close()
        raise ValueError(f"{path.name} has no audio stream; leave the audio input empty for a silent video")
    return container


def check_audio_file(path: str | Path) -> None:
    """Raise the error that muxing ``path``'s sound would raise, before any frame is made."""
    _open_audio_source(Path(path)).close()


def _file_audio(path: Path) -> tuple[int, int, Iterator[np.ndarray]]:
    """(sample rate, channels, chunks [channels, n] float32 planar) of a file's first audio stream."""
    container = _open_audio_source(path)
    stream = container.streams.audio[0]
    rate, channels = stream.rate, min(2, stream.channels)
    resampler = av.AudioResampler(format="fltp", layout="stereo" if channels == 2 else "mono", rate=rate)

    def chunks() -> Iterator[np.ndarray]:
        with container:
            first = True
            for frame in container.decode(stream):
                if first and frame.time:  # audio starting after the video: pad the gap with silence
                    yield np.zeros((channels, round(frame.time * rate)), dtype=np.float32)
                first = False
                for converted in resampler.resample(frame):
                    yield converted.to_ndarray().astype(np.float32, copy=False)

    return rate, channels, chunks()


def _waveform_audio(waveform: torch.Tensor, rate: int) -> tuple[int, int, Iterator[np.ndarray]]:
    channels = min(2, waveform.shape[0])
    step = max(1, int(rate * WAVEFORM_CHUNK_SECONDS))

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, waveform.shape[1], step):
            yield waveform[:channels, start:start + step].detach().float().clamp(-1, 1).cpu().numpy()

    return rate, channels, chunks()


class _AudioMuxer:
    """Pulls audio chunks up to a given time, skipping the first ``start`` samples, and encodes them as AAC."""

    def __init__(self, container, track: AudioTrack) -> None:
        if track.file is not None:
            self.rate, channels, self.source = _file_audio(Path(track.file))
        else:
            self.rate, channels, self.source = _waveform_audio(track.waveform, int(track.sample_rate))
        self.layout = "stereo" if channels == 2 else "mono"
        self.stream = container.add_stream(AUDIO_CODEC, rate=self.rate, layout=self.layout)
        self.stream.bit_rate = AUDIO_BITRATE
        self.container = container
        self.to_skip = round(track.start_seconds * self.rate)
        self.written = 0  # samples
        self.pending: np.ndarray | None = None
        self.exhausted = False

    def _next_chunk(self) -> np.ndarray | None:
        while True:
            if self.pending is not None:
                chunk, self.pending = self.pending, None
            else:
                chunk = next(self.source, None)
                if chunk is None:
                    self.exhausted = True
                    return None
            if self.to_skip:
                dropped = min(self.to_skip, chunk.shape[1])
                chunk, self.to_skip = chunk[:, dropped:], self.to_skip - dropped
            if chunk.shape[1]:
                return chunk

    def write_until(self, seconds: float) -> None:
        """Encode source samples up to ``seconds`` of output time (never past it)."""
        wanted = round(seconds * self.rate)
        while self.written < wanted and not self.exhausted:
            chunk = self._next_chunk()
            if chunk is None:
                break
            take = min(chunk.shape[1], wanted - self.written)
            if take < chunk.shape[1]:
                self.pending = chunk[:, take:]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[:, :take]), format="fltp",
                                               layout=self.layout)
            frame.sample_rate = self.rate
            frame.pts = self.written
            frame.time_base = Fraction(1, self.rate)
            self.container.mux(self.stream.encode(frame))
            self.written += take

    def finish(self, seconds: float) -> None:
        self.write_until(seconds)
        self.container.mux(self.stream.encode(None))
        self.close_source()

    def close_source(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()  # a file source's generator closes its container


class StreamingVideoWriter:
    """H.264 (yuv420p) MP4 written chunk by chunk; frames are [N, H, W, 3] floats in [0, 1].

    The file is created (empty) at once and exclusively: FileExistsError when ``path`` exists, which is never
    replaced. Use as a context manager; on an exception the partial file is removed, so no broken video is
    left behind under the final name.
    """

    def __init__(self, path: str | Path, fps: float, crf: int = 19, codec: str = "libx264",
                 audio: AudioTrack | None = None) -> None:
        if not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive number, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51 (lower is better quality), got {crf}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise FileExistsError(f"{self.path} exists and is never replaced; choose another name") from None
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = crf
        self.codec = codec
        self.frames_written = 0
        self._container = None
        self._stream = None
        self.audio = audio
        self._audio: _AudioMuxer | None = None

    def __enter__(self) -> StreamingVideoWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(discard=exc_type is not None)

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"H.264 with 4:2:0 chroma needs even sides, got {width}x{height}")
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(self.codec, rate=self.fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf)}
        if self.audio is not None:
            self._audio = _AudioMuxer(self._container, self.audio)

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
        if self._audio is not None:  # keep the audio in step with the frames written so far
            self._audio.write_until(self.frames_written / self.fps)

    @property
    def duration_seconds(self) -> float:
        return float(self.frames_written / self.fps)

    def close(self, discard: bool = False) -> None:
        if self._container is not None:
            if not discard:
                self._container.mux(self._stream.encode())
                if self._audio is not None:
                    self._audio.finish(self.frames_written / self.fps)  # cut at the last frame
            elif self._audio is not None:
                self._audio.close_source()
            self._container.close()
            self._container = None
        if discard and self.path.exists():
            self.path.unlink()
