"""Loader nodes: the FlashPortrait DiT (into ComfyUI's Wan model), the portrait encoder, the expression model."""
from __future__ import annotations

import os
from dataclasses import dataclass

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io

from ..flashportrait_core.checkpoints import (CheckpointError, load_state_dict, merge_flashportrait_dit,
                                              preferred_checkpoint)
from ..flashportrait_core.expression.backends import BACKEND_CHOICES, FaceBackendChoice, resolve_face_backend
from ..flashportrait_core.expression.pdfgc import load_fan_encoder
from ..flashportrait_core.conditioning.portrait_encoder import load_portrait_encoder
from . import types
from .model_folders import WEIGHTS_FOLDER, model_file
from .wan_patch import attach_emotion_projections, patch_emotion_blocks

_WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def checkpoint_file(folder: str, name: str) -> str:
    """Path a loader reads for a selected file: ``X.safetensors`` instead of ``X.pt`` when both are there."""
    return str(preferred_checkpoint(model_file(folder, name)))


class FlashPortraitModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitModelLoader",
            display_name="FlashPortrait Model Loader",
            category="FlashPortrait",
            description="Loads Wan 2.1 I2V 14B with the FlashPortrait weights laid over it and the emotion "
                        "attention (NFEB) attached to every block. Output works with ComfyUI's LoRA loaders.",
            inputs=[
                io.Combo.Input("wan_model", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="Wan 2.1 image-to-video 14B diffusion model (models/diffusion_models), "
                                       "e.g. wan2.1_i2v_720p_14B_bf16.safetensors."),
                io.Combo.Input("flashportrait_weights", options=folder_paths.get_filename_list(WEIGHTS_FOLDER),
                               tooltip="FlashPortrait's transformer.pt (or its safetensors conversion) from "
                                       "models/flashportrait. Pickles are read with weights_only=True; "
                                       "X.safetensors beside X.pt is read instead of it."),
                io.Combo.Input("weight_dtype", options=list(_WEIGHT_DTYPES), default="default",
                               tooltip="Storage type of the DiT weights; fp8 halves memory at a small cost "
                                       "in quality."),
            ],
            outputs=[io.Model.Output(tooltip="Wan model with FlashPortrait's emotion attention.")],
        )

    @classmethod
    def execute(cls, wan_model: str, flashportrait_weights: str, weight_dtype: str) -> io.NodeOutput:
        wan_path = checkpoint_file("diffusion_models", wan_model)
        fp_path = checkpoint_file(WEIGHTS_FOLDER, flashportrait_weights)
        merged, projections = merge_flashportrait_dit(load_state_dict(wan_path), load_state_dict(fp_path),
                                                      wan_name=wan_model, flashportrait_name=flashportrait_weights)
        model = comfy.sd.load_diffusion_model_state_dict(merged, model_options=dict(_WEIGHT_DTYPES[weight_dtype]))
        if model is None:
            raise CheckpointError(f"ComfyUI did not recognise {wan_model} as a diffusion model; select the "
                                  f"Wan 2.1 I2V 14B model")
        diffusion_model = model.model.diffusion_model
        if type(model.model).__name__ != "WAN21" or getattr(diffusion_model, "img_emb", None) is None:
            raise CheckpointError(f"{wan_model} loaded as {type(model.model).__name__}, not Wan 2.1 "
                                  f"image-to-video; select the Wan 2.1 I2V 14B model")
        attach_emotion_projections(diffusion_model, projections)
        model.size = 0  # the attached projections count toward the model's memory from now on
        patch_emotion_blocks(model)
        return io.NodeOutput(model)


class FlashPortraitPortraitEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitPortraitEncoderLoader",
            display_name="FlashPortrait Portrait Encoder Loader",
            category="FlashPortrait",
            description="Loads the portrait encoder that turns expression features into emotion tokens.",
            inputs=[
                io.Combo.Input("portrait_encoder", options=folder_paths.get_filename_list(WEIGHTS_FOLDER),
                               tooltip="FlashPortrait's portrait_encoder.pt (models/flashportrait)."),
            ],
            outputs=[types.PortraitEncoder.Output()],
        )

    @classmethod
    def execute(cls, portrait_encoder: str) -> io.NodeOutput:
        state_dict = load_state_dict(checkpoint_file(WEIGHTS_FOLDER, portrait_encoder))
        try:
            encoder = load_portrait_encoder(state_dict)
        except ValueError as error:
            raise CheckpointError(f"{portrait_encoder}: {error}") from None
        return io.NodeOutput(encoder.float())


@dataclass(frozen=True)
class ExpressionModel:
    encoder: torch.nn.Module  # PD-FGC FanEncoder, eval mode
    face_backend: str  # the choice made in the loader: auto, flashportrait, mediapipe or insightface
    backend: FaceBackendChoice | None = None  # what runs (resolved when loaded); None: resolve when used


def insightface_roots() -> list[str]:
    """Folders holding insightface packs: a registered `insightface` model folder, else models/insightface."""
    roots = list(folder_paths.get_folder_paths("insightface")) if "insightface" in \
        folder_paths.folder_names_and_paths else []
    default = os.path.join(folder_paths.models_dir, "insightface")
    return roots + ([default] if default not in roots else [])


def flashportrait_folders() -> list[str]:
    """The flashportrait model folders, where FlashPortrait's face_det.onnx and face_landmark.onnx sit."""
    folders = list(folder_paths.get_folder_paths(WEIGHTS_FOLDER)) if WEIGHTS_FOLDER in \
        folder_paths.folder_names_and_paths else []
    default = os.path.join(folder_paths.models_dir, WEIGHTS_FOLDER)
    return folders + ([default] if default not in folders else [])


def resolve_backend(face_backend: str) -> FaceBackendChoice:
    """The face backend a loader choice runs, searching ComfyUI's model folders."""
    return resolve_face_backend(face_backend, insightface_roots(), flashportrait_folders=flashportrait_folders())


class FlashPortraitExpressionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitExpressionModelLoader",
            display_name="FlashPortrait Expression Model Loader",
            category="FlashPortrait",
            description="Loads the PD-FGC expression encoder and picks the face detector used for alignment.",
            inputs=[
                io.Combo.Input("expression_encoder", options=folder_paths.get_filename_list(WEIGHTS_FOLDER),
                               tooltip="FlashPortrait's pd_fpg.pth (models/flashportrait)."),
                io.Combo.Input("face_backend", options=list(BACKEND_CHOICES), default="auto",
                               tooltip="Face detector giving the 5 alignment points. flashportrait: FlashPortrait's "
                                       "own face_det.onnx + face_landmark.onnx (in models/flashportrait, beside "
                                       "pd_fpg.pth), the published crops, run by onnxruntime. mediapipe: offline "
                                       "on the CPU (pip install mediapipe==0.10.21). insightface: SCRFD from a "
                                       "pack in models/insightface/models/<pack>/ (e.g. buffalo_l). auto: "
                                       "flashportrait when both its files are there, else insightface when a pack "
                                       "is there, else mediapipe."),
            ],
            outputs=[types.ExpressionModel.Output()],
        )

    @classmethod
    def execute(cls, expression_encoder: str, face_backend: str) -> io.NodeOutput:
        backend = resolve_backend(face_backend)  # fails early, saying what is missing
        state_dict = load_state_dict(checkpoint_file(WEIGHTS_FOLDER, expression_encoder))
        try:
            encoder = load_fan_encoder(state_dict)
        except ValueError as error:
            raise CheckpointError(f"{expression_encoder}: {error}") from None
        return io.NodeOutput(ExpressionModel(encoder=encoder.float().eval(), face_backend=face_backend,
                                             backend=backend))
