"""Emotion conditioning and precomputed prompt/CLIP-vision conditioning nodes."""
from __future__ import annotations

import logging
import os

import comfy.clip_vision
import folder_paths
import torch
from comfy_api.latest import io

from ..flashportrait_core.conditioning.prompt_file import load_conditioning_file, save_conditioning_file
from ..flashportrait_core.conditioning.emotion_conditioning import build_emotion_conditioning
from ..flashportrait_core.validation import check_expression_features, trim_note
from . import types
from .model_folders import CONDITIONING_FOLDER, model_file


class FlashPortraitEmotionConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitEmotionConditioning",
            display_name="FlashPortrait Emotion Conditioning",
            category="FlashPortrait",
            description="Turns expression features into emotion tokens per latent frame (driving frames are "
                        "trimmed to 4k+1 as published; the sampler encodes each window's tokens as it reaches "
                        "it) with the strength and guidance of the emotion signal.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="From FlashPortrait Extract Expressions."),
                types.PortraitEncoder.Input("portrait_encoder",
                                          tooltip="From FlashPortrait Portrait Encoder Loader."),
                io.Float.Input("ip_scale", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="Strength of the expression attention in the conditioned pass."),
                io.Float.Input("emo_cfg", default=4.0, min=1.0, max=10.0, step=0.1,
                               tooltip="Emotion guidance scale (published range 2-5). 1 turns it off and "
                                       "saves one model pass per step."),
                io.Float.Input("text_cfg", default=1.0, min=1.0, max=10.0, step=0.1,
                               tooltip="Text guidance scale. Above 1 adds a negative-prompt pass per step."),
            ],
            outputs=[
                types.EmotionConditioning.Output(display_name="emotion"),
                io.String.Output(display_name="report",
                                 tooltip="Driving frames used and latent frames made, and any frames trimmed."),
            ],
        )

    @classmethod
    def execute(cls, expressions, portrait_encoder, ip_scale: float, emo_cfg: float,
                text_cfg: float) -> io.NodeOutput:
        check_expression_features(expressions.features, getattr(expressions, "found", None),
                                  portrait_encoder.config.feature_dim)
        emotion = build_emotion_conditioning(portrait_encoder, expressions.features, ip_scale, emo_cfg, text_cfg)
        report = emotion_report(expressions.features.shape[0], emotion)
        logging.info("FlashPortrait Emotion Conditioning: %s", report)
        return io.NodeOutput(emotion, report, ui={"text": [report]})


def emotion_report(driving_frames: int, emotion) -> str:
    """What the node made of the driving frames: frames used, latent frames, and the trim to 4k + 1."""
    parts = [f"{emotion.num_video_frames} driving frames -> {emotion.num_latent_frames} latent frames"]
    note = trim_note(driving_frames, emotion.num_video_frames)
    if note:
        parts.append(note)
    return "; ".join(parts)


class FlashPortraitSaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitSaveConditioning",
            display_name="FlashPortrait Save Conditioning",
            category="FlashPortrait",
            description="Saves encoded prompts and the reference's CLIP-vision output, so later runs can skip "
                        "the text and CLIP-vision encoders.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Encoded prompt to keep."),
                io.Conditioning.Input("negative", tooltip="Encoded negative prompt to keep."),
                io.ClipVisionOutput.Input("clip_vision_output",
                                          tooltip="CLIP Vision Encode output of the reference image."),
                io.String.Input("name", default="portrait_prompt",
                                tooltip="File name (without extension) in models/flashportrait_conditioning."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, positive, negative, clip_vision_output, name: str) -> io.NodeOutput:
        if not name or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"name '{name}' must be a plain file name without folders")
        folder = folder_paths.get_folder_paths(CONDITIONING_FOLDER)[0]
        save_conditioning_file(os.path.join(folder, f"{name}.safetensors"), positive[0][0], negative[0][0],
                               clip_vision_output.penultimate_hidden_states)
        return io.NodeOutput()


class FlashPortraitLoadConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitLoadConditioning",
            display_name="FlashPortrait Load Conditioning",
            category="FlashPortrait",
            description="Loads prompts and CLIP-vision output saved by FlashPortrait Save Conditioning.",
            inputs=[
                io.Combo.Input("conditioning", options=folder_paths.get_filename_list(CONDITIONING_FOLDER),
                               tooltip="A file in models/flashportrait_conditioning."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.ClipVisionOutput.Output(display_name="clip_vision_output"),
            ],
        )

    @classmethod
    def execute(cls, conditioning: str) -> io.NodeOutput:
        stored = load_conditioning_file(model_file(CONDITIONING_FOLDER, conditioning))
        clip_output = comfy.clip_vision.Output()
        clip_output["penultimate_hidden_states"] = stored.clip_vision_penultimate
        return io.NodeOutput([[stored.positive, {}]], [[stored.negative, {}]], clip_output)
