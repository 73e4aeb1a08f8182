"""Long driving videos for the benchmarks, made from the real clips of ``../shared/data/driving``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DRIVING = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "driving"


def concatenate_clips(path: Path, clips: Sequence[str], frame_count: int, side: int, fps: int = 25) -> int:
    """Cycle through ``clips`` into a ``side``-square H.264 MP4 at ``fps`` until it holds ``frame_count`` frames.

    Every source frame is kept and re-timed to ``fps``; returns the frame count. An existing file with that many
    frames is reused; the file appears only once complete.
    """
    import av

    if path.is_file():
        with av.open(str(path)) as existing:
            if existing.streams.video[0].frames == frame_count:
                return frame_count
    partial = path.with_suffix(".partial.mp4")
    written = 0
    with av.open(str(partial), "w") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        while written < frame_count:
            for clip in clips:
                with av.open(str(DRIVING / clip)) as source:
                    for frame in source.decode(video=0):
                        if written == frame_count:
                            break
                        pixels = frame.reformat(width=side, height=side, format="rgb24").to_ndarray()
                        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                            output.mux(packet)
                        written += 1
                if written == frame_count:
                    break
        for packet in stream.encode():
            output.mux(packet)
    partial.replace(path)
    return written
