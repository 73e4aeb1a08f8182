"""Streaming decode to an MP4: the same pixels as one-shot decoding, the right frames, fps and duration."""
from __future__ import annotations

import math
import os
from pathlib import Path

import av
import pytest
import torch

from pack import import_pack
from tiny_nodes import tiny_vae  # noqa: F401 (fixture)

pack = import_pack()
import comfy.model_management  # noqa: E402
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
    with pytest.raises(ValueError, match="audio_file 'missing.mp4' was not found in ComfyUI's input folder"):
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


def _tiled_reference(vae, latents, tile, overlap):
    """ComfyUI's own tiled decoding of the whole video at once (what its VAE falls back to)."""
    return vae.decode_tiled(latents, tile_x=tile, tile_y=tile, overlap=overlap)[0]


def test_tiled_streaming_equals_comfyuis_tiled_decoding(tiny_vae):
    latents = torch.randn(1, 16, 3, 6, 6, generator=torch.Generator().manual_seed(1))  # 2x2 tiles of 4, overlap 2
    decoder = stream.StreamDecoder(tiny_vae, latents, tiled=True, tile=4, overlap=2)
    streamed = torch.cat(list(decoder))
    reference = _tiled_reference(tiny_vae, latents, tile=4, overlap=2)
    assert streamed.shape == reference.shape == (9, 48, 48, 3)
    assert decoder.tiled_from == 0
    assert (streamed - reference).abs().max().item() < 1e-5
    whole = tiny_vae.decode(latents)[0]
    assert (streamed - whole).abs().max().item() > 1e-4  # tiles really were blended, not one whole frame


def test_a_frame_that_does_not_fit_goes_over_to_tiles(tiny_vae):
    """An out-of-memory error in latent frame 2 (raised by a hook: a GPU's allocator cannot fail on this machine)
    switches to tiles from there on; the frames already written stay as decoded whole."""
    latents = torch.randn(1, 16, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    decoder = stream.StreamDecoder(tiny_vae, latents, tile=4, overlap=2)
    state = {"latent_frame": 0, "raised": False}
    conv2 = tiny_vae.first_stage_model.conv2

    def out_of_memory_once(module, args):
        if args[0].shape[-1] == latents.shape[-1] and state["latent_frame"] == 2 and not state["raised"]:
            state["raised"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if args[0].shape[-1] == latents.shape[-1]:
            state["latent_frame"] += 1

    hook = conv2.register_forward_pre_hook(out_of_memory_once)
    try:
        chunks = list(decoder)
    finally:
        hook.remove()
    assert state["raised"] and decoder.tiled_from == 2
    assert [c.shape[0] for c in chunks] == [1, 4, 4]
    whole = tiny_vae.decode(latents)[0]
    tiled = _tiled_reference(tiny_vae, latents, tile=4, overlap=2)
    streamed = torch.cat(chunks)
    assert (streamed[:5] - whole[:5]).abs().max().item() < 1e-5
    assert (streamed[5:] - tiled[5:]).abs().max().item() < 1e-5


def test_on_the_cpu_comfyuis_estimate_decides(tiny_vae, monkeypatch):
    """Running out of RAM raises nothing to catch, so ComfyUI's memory estimate picks tiles up front (the estimate
    is replaced by one above the free memory: the test cannot make this machine's memory run short)."""
    latents = _latents(frames=2)
    assert stream.StreamDecoder(tiny_vae, latents)._frame_fits()
    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    monkeypatch.setattr(tiny_vae, "memory_used_decode", lambda shape, dtype: 2 * free)
    decoder = stream.StreamDecoder(tiny_vae, latents)
    frames = torch.cat(list(decoder))
    assert decoder.tiled_from == 0 and frames.shape == (5, 32, 48, 3)


def test_an_interrupt_stops_decoding_within_one_layer(tiny_vae):
    latents = _latents(frames=2)
    calls = {"after_interrupt": 0, "layers": 0}

    def count(module, args):
        calls["layers"] += 1
        if calls["layers"] == 10:
            comfy.model_management.interrupt_current_processing(True)
        elif calls["layers"] > 10:
            calls["after_interrupt"] += 1

    leaves = [m for m in tiny_vae.first_stage_model.decoder.modules() if not list(m.children())]
    hooks = [m.register_forward_pre_hook(count) for m in leaves]
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            list(stream.stream_decode(tiny_vae, latents))
    finally:
        for hook in hooks:
            hook.remove()
        comfy.model_management.interrupt_current_processing(False)
    assert calls["after_interrupt"] == 0  # stopped before the next layer ran
    assert len(list(stream.stream_decode(tiny_vae, latents))) == 2  # the flag was consumed; decoding works


def test_one_latent_frame_without_the_reference_is_refused(tiny_vae, tmp_path):
    folder_paths.set_output_directory(str(tmp_path))
    node = decode_node.FlashPortraitDecodeToVideo
    with pytest.raises(ValueError, match="nothing to write: 1 latent frame is the reference frame alone"):
        node.execute({"samples": _latents(frames=1)}, tiny_vae, 25.0, "short", 19, True)
    assert list(tmp_path.iterdir()) == []  # no file, and no name taken
    output = node.execute({"samples": _latents(frames=1)}, tiny_vae, 25.0, "short", 19, False)
    with av.open(output.result[0]) as container:
        assert sum(1 for _ in container.decode(video=0)) == 1
    assert output.ui["text"] == [f"wrote {output.result[0]}: 1 frames at 25 fps, 48x32"]


def test_runs_never_replace_a_file(tiny_vae, tmp_path):
    folder_paths.set_output_directory(str(tmp_path))
    node = decode_node.FlashPortraitDecodeToVideo
    first = node.execute({"samples": _latents(frames=2)}, tiny_vae, 25.0, "again", 19, True).result[0]
    second = node.execute({"samples": _latents(frames=2, seed=1)}, tiny_vae, 25.0, "again", 19, True).result[0]
    assert (os.path.basename(first), os.path.basename(second)) == ("again_00001_.mp4", "again_00002_.mp4")
    # A name taken between ComfyUI's count and the write (another program): the next number is used.
    (tmp_path / "again_00004_.mp4").write_bytes(b"a user's file")
    original = folder_paths.get_save_image_path
    folder_paths.get_save_image_path = lambda *args: (str(tmp_path), "again", 4, "", "again")
    try:
        third = node.execute({"samples": _latents(frames=2)}, tiny_vae, 25.0, "again", 19, True).result[0]
    finally:
        folder_paths.get_save_image_path = original
    assert os.path.basename(third) == "again_00005_.mp4"
    assert (tmp_path / "again_00004_.mp4").read_bytes() == b"a user's file"


@pytest.mark.parametrize("prefix, words", [
    ("", "filename_prefix is empty"),
    ("   ", "filename_prefix is empty"),
    ("video/", "ends in a folder and names no file"),
    (".hidden", "would write a hidden file ('.hidden_00000_.mp4')"),
    ("x" * 300, "is too long: a file or folder name takes at most 255 bytes"),
    ("../elsewhere/clip", "leads outside ComfyUI's output folder"),
    ("/tmp/clip", "leads outside ComfyUI's output folder"),
])
def test_bad_prefixes_are_named_before_anything_runs(tiny_vae, tmp_path, prefix, words):
    folder_paths.set_output_directory(str(tmp_path))
    node = decode_node.FlashPortraitDecodeToVideo
    message = node.validate_inputs(filename_prefix=prefix)
    assert words in message and "give a name such as 'video/FlashPortrait'" in message
    with pytest.raises(ValueError, match="filename_prefix"):
        node.execute({"samples": _latents(frames=2)}, tiny_vae, 25.0, prefix, 19, True)
    assert node.validate_inputs(filename_prefix="video/ok") is True


def test_bad_audio_files_are_named(tiny_vae, tmp_path, monkeypatch):
    folder_paths.set_output_directory(str(tmp_path / "out"))
    inputs = tmp_path / "in"
    (inputs / "clips").mkdir(parents=True)
    (inputs / "notes.mp4").write_text("not media\n" * 100)
    (inputs / "empty.m4a").write_bytes(b"")
    folder_paths.set_input_directory(str(inputs))
    node = decode_node.FlashPortraitDecodeToVideo
    monkeypatch.delenv("FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS", raising=False)
    cases = {
        "clips": "audio_file 'clips' is a folder",
        "notes.mp4": "audio_file 'notes.mp4': audio source notes.mp4 is not a video or audio file that can be read "
                     "(Invalid data found when processing input); give a media file with sound",
        "empty.m4a": "audio_file 'empty.m4a': audio source empty.m4a is an empty file (0 bytes)",
        str(DRIVING / "lp_d18.mp4"): f"audio_file '{DRIVING / 'lp_d18.mp4'}' is outside ComfyUI's input folder",
        "../in/../../x.mp4": "audio_file '../in/../../x.mp4' is outside ComfyUI's input folder",
    }
    for name, words in cases.items():
        with pytest.raises(ValueError) as raised:
            node.execute({"samples": _latents(frames=2)}, tiny_vae, 25.0, "x", 19, True, audio_file=name)
        assert words in str(raised.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    monkeypatch.setenv("FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS", "1")
    path = node.execute({"samples": _latents(frames=2)}, tiny_vae, 25.0, "x", 19, True,
                        audio_file=str(DRIVING / "lp_d18.mp4")).result[0]
    assert _streams(path)[3] == 44100
