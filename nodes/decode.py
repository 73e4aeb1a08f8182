"""Decode-to-file node: latents straight into an MP4, never holding the whole video in memory."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..flashportrait_core.video_writer import AudioTrack, StreamingVideoWriter
from .wan_vae_stream import is_wan21_vae, stream_decode


class FlashPortraitDecodeToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitDecodeToVideo",
            display_name="FlashPortrait Decode to Video File",
            category="FlashPortrait",
            description="Decodes the sampler's latents one latent frame at a time with the Wan 2.1 VAE (its "
                        "causal state carried across frames, so there are no seams) and writes an H.264 MP4 as "
                        "it goes: memory stays flat however long the video is.",
            inputs=[
                io.Latent.Input("latent", tooltip="From FlashPortrait Sampler."),
                io.Vae.Input("vae", tooltip="Wan 2.1 VAE (wan_2.1_vae.safetensors)."),
                io.Float.Input("fps", default=25.0, min=1.0, max=120.0, step=0.01,
                               tooltip="Frame rate of the file; use the driving video's (Get Video Components)."),
                io.String.Input("filename_prefix", default="video/FlashPortrait",
                                tooltip="Path under ComfyUI's output folder; a counter is appended."),
                io.Int.Input("crf", default=19, min=0, max=51,
                             tooltip="H.264 quality: lower is better and larger (19 is visually lossless)."),
                io.Boolean.Input("drop_reference_frame", default=True,
                                 tooltip="Leave out frame 0, which is the reference image itself (as published)."),
                io.String.Input("audio_file", optional=True, force_input=True,
                                tooltip="Optional: a video or audio file whose sound is added, e.g. the driving "
                                        "video (a name in ComfyUI's input folder or a full path). Read as the "
                                        "video is written, re-encoded to AAC and cut at the last frame."),
                io.Audio.Input("audio", optional=True,
                               tooltip="Optional: sound to add instead, e.g. from Get Video Components of the "
                                       "driving video; encoded to AAC and cut at the last frame."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written MP4.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent: dict, vae, fps: float, filename_prefix: str, crf: int,
                drop_reference_frame: bool, audio_file: str | None = None, audio: dict | None = None
                ) -> io.NodeOutput:
        if not is_wan21_vae(vae):
            raise ValueError("vae must be the Wan 2.1 VAE (wan_2.1_vae.safetensors); the selected VAE is "
                             f"{type(getattr(vae, 'first_stage_model', vae)).__name__}")
        samples = latent["samples"]
        # Written frame 0 is driving frame 1 when the reference frame is left out: start the sound there too.
        audio_track = audio_track_for(audio_file, audio, start_seconds=1.0 / fps if drop_reference_frame else 0.0)
        output_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, samples.shape[-1] * 8, samples.shape[-2] * 8)
        file = f"{filename}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        progress = comfy.utils.ProgressBar(samples.shape[2])
        with StreamingVideoWriter(path, fps, crf, audio=audio_track) as writer:
            for index, frames in enumerate(stream_decode(vae, samples)):
                comfy.model_management.throw_exception_if_processing_interrupted()
                writer.write(frames[1:] if index == 0 and drop_reference_frame else frames)
                progress.update(1)
        return io.NodeOutput(path, ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))


def audio_track_for(audio_file: str | None, audio: dict | None, start_seconds: float) -> AudioTrack | None:
    """The node's optional sound inputs as an AudioTrack (None when both are empty)."""
    name = (audio_file or "").strip()
    if name and audio is not None:
        raise ValueError("give either audio_file or audio, not both")
    if name:
        path = name if os.path.isabs(name) else folder_paths.get_annotated_filepath(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"audio_file {name!r} was not found (looked for {path}); give a file in "
                                    f"ComfyUI's input folder or a full path")
        return AudioTrack(file=path, start_seconds=start_seconds)
    if audio is not None:
        waveform = audio.get("waveform") if isinstance(audio, dict) else None
        if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3 or waveform.shape[0] < 1:
            raise ValueError("audio must be ComfyUI AUDIO ({'waveform': [batch, channels, samples], "
                             "'sample_rate': int}), e.g. from Get Video Components or Load Audio")
        return AudioTrack(waveform=waveform[0], sample_rate=int(audio["sample_rate"]), start_seconds=start_seconds)
    return None
