"""Streaming decode to an MP4: the same pixels as one-shot decoding, the right frames, fps and duration."""
from __future__ import annotations

import math
from pathlib import Path

import av
import pytest
import torch

from pack import import_pack
from tiny_nodes import tiny_vae  # noqa: F401 (fixture)

pack = import_pack()
import folder_paths  # noqa: E402

DRIVING = Path(__file__).resolve().parents[2] / "shared" / "data" / "driving"
decode_node = pack.nodes.decode
stream = pack.nodes.wan_vae_stream


def _latents(frames=5, seed=0):
    return torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


def test_streamed_frames_equal_one_shot_decoding(tiny_vae):
    latents = _latents()
    one_shot = tiny_vae.decode(latents)[0]  # [frames, H, W, 3]
    chunks = list(stream.stream_decode(tiny_vae, latents))
    assert [c.shape[0] for c in chunks] == [1, 4, 4, 4, 4]
    streamed = torch.cat(chunks)
    assert streamed.shape == one_shot.shape == (17, 32, 48, 3)
    max_abs_diff = (streamed - one_shot).abs().max().item()
    print(f"streamed vs one-shot decode: max abs diff {max_abs_diff:.3g}")
    assert max_abs_diff < 1e-5


def test_node_writes_an_mp4_with_the_right_frames_fps_and_duration(tiny_vae, tmp_path):
    folder_paths.set_output_directory(str(tmp_path))
    output = decode_node.FlashPortraitDecodeToVideo.execute(
        {"samples": _latents(frames=7)}, tiny_vae, 25.0, "video/streamed", 19, True)
    path = output.result[0]
    assert path.startswith(str(tmp_path)) and path.endswith(".mp4")
    with av.open(path) as container:
        video = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video)]
        assert float(video.average_rate) == 25.0
        duration = float(container.duration / av.time_base)
    assert len(frames) == 24  # 4 * (7 - 1) + 1 frames, minus the reference frame
    assert frames[0].shape == (32, 48, 3)
    assert duration == pytest.approx(24 / 25, abs=0.05)
    ui = output.ui.as_dict() if hasattr(output.ui, "as_dict") else output.ui
    assert "streamed" in str(ui)


def test_keeping_the_reference_frame_and_a_bad_vae(tiny_vae, tmp_path):
    folder_paths.set_output_directory(str(tmp_path))
    path = decode_node.FlashPortraitDecodeToVideo.execute(
        {"samples": _latents(frames=2)}, tiny_vae, 30.0, "keep", 23, False).result[0]
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    with pytest.raises(ValueError, match="Wan 2.1 VAE"):
        decode_node.FlashPortraitDecodeToVideo.execute({"samples": _latents(2)}, object(), 25.0, "x", 19, True)


def _streams(path):
    with av.open(path) as container:  # one pass over the packets of both streams
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = samples = 0
        for packet in container.demux(video, audio):
            for frame in packet.decode():
                frames += packet.stream is video
                samples += frame.samples if packet.stream is audio else 0
        return frames, float(video.average_rate), float(video.duration * video.time_base), audio.rate, samples


def test_node_adds_the_driving_videos_sound(tiny_vae, tmp_path):
    """audio_file from the input folder (lp_d18.mp4 has AAC sound): 24 frames at 25 fps carry 0.96 s of it."""
    folder_paths.set_output_directory(str(tmp_path / "out"))
    folder_paths.set_input_directory(str(DRIVING))
    path = decode_node.FlashPortraitDecodeToVideo.execute(
        {"samples": _latents(frames=7)}, tiny_vae, 25.0, "video/sound", 19, True, audio_file="lp_d18.mp4").result[0]
    frames, fps, video_seconds, rate, samples = _streams(path)
    assert (frames, fps, rate) == (24, 25.0, 44100)
    assert video_seconds == pytest.approx(24 / 25)
    assert abs(samples / rate - video_seconds) < 1024 / rate + 1e-6  # within one AAC frame
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        decode_node.FlashPortraitDecodeToVideo.execute(
            {"samples": _latents(frames=2)}, tiny_vae, 25.0, "x", 19, True, audio_file="missing.mp4")


def test_node_adds_comfyui_audio_and_refuses_two_sources(tiny_vae, tmp_path):
    folder_paths.set_output_directory(str(tmp_path))
    rate = 16000
    tone = torch.sin(torch.arange(rate * 3) / rate * 2 * math.pi * 300).reshape(1, 1, -1).repeat(1, 2, 1) * 0.3
    audio = {"waveform": tone, "sample_rate": rate}
    path = decode_node.FlashPortraitDecodeToVideo.execute(
        {"samples": _latents(frames=4)}, tiny_vae, 12.5, "video/tone", 19, False, audio=audio).result[0]
    frames, fps, video_seconds, got_rate, samples = _streams(path)
    assert (frames, fps, got_rate) == (13, 12.5, rate)
    assert abs(samples / rate - 13 / 12.5) < 1024 / rate + 1e-6
    with pytest.raises(ValueError, match="not both"):
        decode_node.FlashPortraitDecodeToVideo.execute(
            {"samples": _latents(frames=2)}, tiny_vae, 25.0, "x", 19, True, audio_file="a.mp4", audio=audio)
