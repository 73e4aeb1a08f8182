"""Decode-to-file node: latents straight into an MP4, never holding the whole video in memory."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..flashportrait_core.video_writer import StreamingVideoWriter
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
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Absolute path of the written MP4.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent: dict, vae, fps: float, filename_prefix: str, crf: int,
                drop_reference_frame: bool) -> io.NodeOutput:
        if not is_wan21_vae(vae):
            raise ValueError("vae must be the Wan 2.1 VAE (wan_2.1_vae.safetensors); the selected VAE is "
                             f"{type(getattr(vae, 'first_stage_model', vae)).__name__}")
        samples = latent["samples"]
        output_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, samples.shape[-1] * 8, samples.shape[-2] * 8)
        file = f"{filename}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        progress = comfy.utils.ProgressBar(samples.shape[2])
        with StreamingVideoWriter(path, fps, crf) as writer:
            for index, frames in enumerate(stream_decode(vae, samples)):
                comfy.model_management.throw_exception_if_processing_interrupted()
                writer.write(frames[1:] if index == 0 and drop_reference_frame else frames)
                progress.update(1)
        return io.NodeOutput(path, ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))
