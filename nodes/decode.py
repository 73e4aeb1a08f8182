"""Decode-to-file node: latents straight into an MP4, never holding the whole video in memory."""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..flashportrait_core.video_writer import AudioTrack, StreamingVideoWriter, check_audio_file
from .input_files import NAME_MAX, InputFileError, resolve_input_file
from .wan_vae_stream import StreamDecoder, is_wan21_vae

COUNTER_SUFFIX = "_00000_.mp4"  # what the node appends to the prefix's file name


def check_filename_prefix(prefix: str) -> str | None:
    """Why ``prefix`` cannot name the output file (None when it can)."""
    example = "give a name such as 'video/FlashPortrait' (a folder under ComfyUI's output folder, then a file name)"
    if not prefix.strip():
        return f"filename_prefix is empty; {example}"
    name = os.path.basename(os.path.normpath(prefix))
    if prefix.rstrip().endswith(("/", "\\")) or not name.strip() or name in (".", ".."):
        return f"filename_prefix '{prefix}' ends in a folder and names no file; {example}"
    if name.startswith("."):
        return f"filename_prefix '{prefix}' would write a hidden file ('{name}{COUNTER_SUFFIX}'); {example}"
    longest = max(len(part.encode()) for part in prefix.replace("\\", "/").split("/"))
    if len((name + COUNTER_SUFFIX).encode()) > NAME_MAX or longest > NAME_MAX:
        return (f"filename_prefix '{prefix[:40]}...' is too long: a file or folder name takes at most {NAME_MAX} "
                f"bytes, the counter and '.mp4' included; {example}")
    output = os.path.abspath(folder_paths.get_output_directory())
    folder = os.path.abspath(os.path.join(output, os.path.dirname(os.path.normpath(prefix))))
    if os.path.commonpath([output, folder]) != output:
        return f"filename_prefix '{prefix}' leads outside ComfyUI's output folder ({output}); {example}"
    return None


def frames_to_write(latent_frames: int, drop_reference_frame: bool) -> int:
    """Video frames the node writes for ``latent_frames`` (4 per latent frame after the first)."""
    return 1 + 4 * (latent_frames - 1) - (1 if drop_reference_frame else 0)


class FlashPortraitDecodeToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitDecodeToVideo",
            display_name="FlashPortrait Decode to Video File",
            category="FlashPortrait",
            description="Decodes the sampler's latents one latent frame at a time with the Wan 2.1 VAE (its "
                        "causal state carried across frames, so there are no seams) and writes an H.264 MP4 as "
                        "it goes: memory stays flat however long the video is. A frame too large for memory is "
                        "decoded in ComfyUI's tiles instead. Never replaces an existing file.",
            inputs=[
                io.Latent.Input("latent", tooltip="From FlashPortrait Sampler."),
                io.Vae.Input("vae", tooltip="Wan 2.1 VAE (wan_2.1_vae.safetensors)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.01,
                               tooltip="Frame rate of the file; connect the driving video's (the fps output of "
                                       "the video-file extraction, or Get Video Components)."),
                io.String.Input("filename_prefix", default="video/FlashPortrait",
                                tooltip="Path under ComfyUI's output folder; a counter is appended, so an "
                                        "existing file is never replaced."),
                io.Int.Input("crf", default=19, min=0, max=51,
                             tooltip="H.264 quality: lower is better and larger (19 is visually lossless)."),
                io.Boolean.Input("drop_reference_frame", default=True,
                                 tooltip="Leave out frame 0, which is the reference image itself (as published)."),
                io.String.Input("audio_file", optional=True, force_input=True,
                                tooltip="Optional: a video or audio file whose sound is added, e.g. the driving "
                                        "video: a name in ComfyUI's input folder (or 'name [output]'); paths "
                                        "outside are refused unless the server runs with "
                                        "FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS=1. Read as the video is written, "
                                        "re-encoded to AAC and cut at the last frame."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Optional: sound to add instead, e.g. from Get Video Components of the "
                                       "driving video; encoded to AAC and cut at the last frame."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written MP4.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        if filename_prefix is None:  # linked: checked when it runs
            return True
        return check_filename_prefix(filename_prefix) or True

    @classmethod
    def execute(cls, latent: dict, vae, fps: float, filename_prefix: str, crf: int,
                drop_reference_frame: bool, audio_file: str | None = None, audio: dict | None = None
                ) -> io.NodeOutput:
        if not is_wan21_vae(vae):
            raise ValueError("vae must be the Wan 2.1 VAE (wan_2.1_vae.safetensors); the selected VAE is "
                             f"{type(getattr(vae, 'first_stage_model', vae)).__name__}")
        problem = check_filename_prefix(filename_prefix)
        if problem:
            raise ValueError(problem)
        samples = latent["samples"]
        total = frames_to_write(samples.shape[2], drop_reference_frame)
        if total < 1:
            raise ValueError(
                f"nothing to write: {samples.shape[2]} latent frame is the reference frame alone, and "
                f"drop_reference_frame leaves it out. Give at least 5 driving frames (2 latent frames), or turn "
                f"drop_reference_frame off to write the single frame")
        # Written frame 0 is driving frame 1 when the reference frame is left out: start the sound there too.
        audio_track = audio_track_for(audio_file, audio, start_seconds=1.0 / fps if drop_reference_frame else 0.0)
        height, width = samples.shape[-2] * 8, samples.shape[-1] * 8
        decoder = StreamDecoder(vae, samples)
        progress = comfy.utils.ProgressBar(samples.shape[2])
        writer, file, subfolder = numbered_video_writer(filename_prefix, width, height, fps, crf, audio_track)
        with writer:
            for index, frames in enumerate(decoder):
                comfy.model_management.throw_exception_if_processing_interrupted()
                writer.write(frames[1:] if index == 0 and drop_reference_frame else frames)
                progress.update(1)
            if writer.frames_written != total:  # the file is removed: no result is reported that did not happen
                raise RuntimeError(f"the decoder gave {writer.frames_written} frames, {total} expected")
        report = (f"wrote {writer.path}: {writer.frames_written} frames at {fps:g} fps, {width}x{height}"
                  + (f"; decoded in tiles from latent frame {decoder.tiled_from} on (a whole frame does not fit "
                     f"in memory)" if decoder.tiled_from is not None else ""))
        logging.info("FlashPortrait Decode to Video File: %s", report)
        preview = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]).as_dict()
        return io.NodeOutput(str(writer.path), ui={**preview, "text": [report]})


WRITER_ATTEMPTS = 100


def numbered_video_writer(prefix: str, width: int, height: int, fps: float, crf: int,
                          audio: AudioTrack | None) -> tuple[StreamingVideoWriter, str, str]:
    """(writer, file name, subfolder) on the next free ``<prefix>_NNNNN_.mp4`` in the output folder: ComfyUI's
    counter, moved on when another writer took that name meanwhile (the writer creates its file exclusively)."""
    output_dir = folder_paths.get_output_directory()
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir, width, height)
    for number in range(counter, counter + WRITER_ATTEMPTS):
        file = f"{filename}_{number:05}_.mp4"
        try:
            return StreamingVideoWriter(os.path.join(folder, file), fps, crf, audio=audio), file, subfolder
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder} already holds {filename}_{counter:05}_.mp4 to "
                          f"_{counter + WRITER_ATTEMPTS - 1:05}_.mp4; choose another filename_prefix")


def audio_track_for(audio_file: str | None, audio: dict | None, start_seconds: float) -> AudioTrack | None:
    """The node's optional sound inputs as an AudioTrack (None when both are empty); the file is checked now."""
    name = (audio_file or "").strip()
    if name and audio is not None:
        raise ValueError("give either audio_file or audio, not both")
    if name:
        path = resolve_input_file(name, "audio_file")
        try:
            check_audio_file(path)
        except ValueError as error:
            raise InputFileError(f"audio_file '{name}': {error}") from None
        return AudioTrack(file=path, start_seconds=start_seconds)
    if audio is not None:
        waveform = audio.get("waveform") if isinstance(audio, dict) else None
        if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or waveform.shape[0] < 1:
            raise ValueError("audio must be ComfyUI AUDIO ({'waveform': [batch, channels, samples], "
                             "'sample_rate': int}), e.g. from Get Video Components or Load Audio")
        return AudioTrack(waveform=waveform[0], sample_rate=int(audio["sample_rate"]), start_seconds=start_seconds)
    return None
