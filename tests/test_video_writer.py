"""The streaming MP4 writer."""
from __future__ import annotations

import av
import pytest
import torch

from flashportrait_core.video_writer import StreamingVideoWriter


def test_chunks_append_and_read_back(tmp_path):
    path = tmp_path / "out.mp4"
    gradient = torch.linspace(0, 1, 32).reshape(1, 1, 32, 1).expand(3, 16, 32, 3)
    with StreamingVideoWriter(path, fps=24.0, crf=10) as writer:
        writer.write(gradient[:1])
        writer.write(gradient[1:])
    assert writer.frames_written == 3
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert float(container.streams.video[0].average_rate) == 24.0
    assert len(frames) == 3 and frames[0].shape == (16, 32, 3)
    assert abs(frames[0][8, 31, 0] / 255.0 - 1.0) < 0.05 and frames[0][8, 0, 0] < 15


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "broken.mp4"
    with pytest.raises(RuntimeError):
        with StreamingVideoWriter(path, fps=25.0) as writer:
            writer.write(torch.zeros(2, 16, 16, 3))
            raise RuntimeError("interrupted")
    assert not path.exists()


@pytest.mark.parametrize("kwargs, frames, message", [
    ({"fps": 0.0}, None, "fps"),
    ({"fps": 25.0, "crf": 60}, None, "crf"),
    ({"fps": 25.0}, torch.zeros(1, 15, 16, 3), "even sides"),
    ({"fps": 25.0}, torch.zeros(1, 16, 16), r"\[N, H, W, 3\]"),
])
def test_bad_settings_and_frames_are_named(tmp_path, kwargs, frames, message):
    with pytest.raises(ValueError, match=message):
        with StreamingVideoWriter(tmp_path / "x.mp4", **kwargs) as writer:
            writer.write(frames)
    assert not (tmp_path / "x.mp4").exists()
