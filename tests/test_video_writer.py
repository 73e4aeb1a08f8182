"""The streaming MP4 writer."""
from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from flashportrait_core.video_writer import AudioTrack, StreamingVideoWriter

DRIVING = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving"


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


def _audio_of(path):
    """(sample rate, channels, samples, the video's and the audio's duration in s) read back with PyAV."""
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        samples = sum(frame.samples for frame in container.decode(audio))
        video = container.streams.video[0]
        video_seconds = float(video.duration * video.time_base)
        return audio.rate, audio.channels, samples, video_seconds


def test_driving_video_sound_is_muxed_and_cut_at_the_last_frame(tmp_path):
    """lp_d18.mp4 (7.2 s, AAC stereo 44.1 kHz): 2 s of frames take 2 s of its sound, from 1/25 s on."""
    path = tmp_path / "with_sound.mp4"
    track = AudioTrack(file=DRIVING / "lp_d18.mp4", start_seconds=1 / 25)
    with StreamingVideoWriter(path, fps=25.0, audio=track) as writer:
        for _ in range(10):
            writer.write(torch.rand(5, 16, 16, 3))
    rate, channels, samples, video_seconds = _audio_of(path)
    assert (rate, channels) == (44100, 2)
    assert video_seconds == pytest.approx(2.0)
    # AAC is coded in frames of 1024 samples: the last one is padded, so allow one frame over.
    assert 2.0 * rate <= samples <= 2.0 * rate + 1024


def test_waveform_sound_keeps_its_content_and_a_short_track_stays_short(tmp_path):
    rate = 48000
    t = torch.arange(rate) / rate  # 1 s of a 440 Hz tone, shorter than the 2 s video
    tone = 0.5 * torch.sin(2 * math.pi * 440 * t).unsqueeze(0)
    path = tmp_path / "tone.mp4"
    with StreamingVideoWriter(path, fps=25.0, audio=AudioTrack(waveform=tone, sample_rate=rate)) as writer:
        writer.write(torch.rand(50, 16, 16, 3))
    got_rate, channels, samples, video_seconds = _audio_of(path)
    assert (got_rate, channels) == (rate, 1) and video_seconds == pytest.approx(2.0)
    assert rate <= samples <= rate + 2048
    with av.open(str(path)) as container:
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)[0]
    middle = decoded[rate // 4: rate // 2]
    assert np.sqrt(np.mean(middle ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.argmax(spectrum) * rate / len(middle) == pytest.approx(440, abs=5)


def test_bad_audio_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="exactly one source"):
        AudioTrack()
    with pytest.raises(ValueError, match=r"\[channels, samples\]"):
        AudioTrack(waveform=torch.zeros(10), sample_rate=8000)
    with pytest.raises(ValueError, match="no audio stream"):  # lp_d0.mp4 is silent
        with StreamingVideoWriter(tmp_path / "x.mp4", 25.0, audio=AudioTrack(file=DRIVING / "lp_d0.mp4")) as w:
            w.write(torch.zeros(1, 16, 16, 3))
    assert not (tmp_path / "x.mp4").exists()
