"""Loader nodes: the FlashPortrait DiT (into ComfyUI's Wan model), the portrait encoder, the expression model."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io

from ..flashportrait_core.weights.reader import open_checkpoint
from ..flashportrait_core.weights.checkpoints import (BASE, FLASHPORTRAIT, CheckpointError,
                                                      flashportrait_holds_complete_dit, load_state_dict,
                                                      plan_flashportrait_dit)
from ..flashportrait_core.expression.backends import BACKEND_CHOICES, FaceBackendChoice, resolve_face_backend
from ..flashportrait_core.expression.pdfgc import load_fan_encoder
from ..flashportrait_core.conditioning.portrait_encoder import load_portrait_encoder, split_portrait_encoder_keys
from . import types
from .dit_loading import build_flashportrait_model
from .model_folders import WEIGHTS_FOLDER, model_file

_WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


NO_WAN_BASE = "none"  # the wan_model choice for a FlashPortrait file that holds the whole DiT


def _ignored_keys_note(keys: list[str]) -> str:
    return f"{len(keys)} ignored (not part of the model): {keys[:5]}{' ...' if len(keys) > 5 else ''}"


class FlashPortraitModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitModelLoader",
            display_name="FlashPortrait Model Loader",
            category="FlashPortrait",
            description="Loads Wan 2.1 I2V 14B with the FlashPortrait weights laid over it and the emotion "
                        "attention (NFEB) attached to every block, reading the files tensor by tensor (host memory: "
                        "the model plus one block). Output works with ComfyUI's LoRA loaders.",
            inputs=[
                io.Combo.Input("wan_model", options=[*folder_paths.get_filename_list("diffusion_models"), NO_WAN_BASE],
                               tooltip="Wan 2.1 image-to-video 14B diffusion model (models/diffusion_models), "
                                       "e.g. wan2.1_i2v_720p_14B_bf16.safetensors, or a plain fp8 version. Not read "
                                       "when the FlashPortrait file holds the complete DiT (then 'none' will do). "
                                       "ComfyUI's scaled fp8 files are refused (their scales do not fit the "
                                       "FlashPortrait weights): use bf16 with weight_dtype fp8_e4m3fn."),
                io.Combo.Input("flashportrait_weights", options=folder_paths.get_filename_list(WEIGHTS_FOLDER),
                               tooltip="FlashPortrait's transformer.pt (or its safetensors conversion) from "
                                       "models/flashportrait. Pickles are read with weights_only=True and "
                                       "memory-mapped; the file chosen is the file read."),
                io.Combo.Input("weight_dtype", options=list(_WEIGHT_DTYPES), default="default",
                               tooltip="Storage type of the DiT weights; fp8 halves memory at a small cost "
                                       "in quality."),
            ],
            outputs=[io.Model.Output(tooltip="Wan model with FlashPortrait's emotion attention.")],
        )

    @classmethod
    def execute(cls, wan_model: str, flashportrait_weights: str, weight_dtype: str) -> io.NodeOutput:
        source = ModelSource(wan_path=None if wan_model == NO_WAN_BASE else model_file("diffusion_models", wan_model),
                             flashportrait_path=model_file(WEIGHTS_FOLDER, flashportrait_weights),
                             weight_dtype=weight_dtype, wan_name=wan_model, flashportrait_name=flashportrait_weights)
        model, report = load_flashportrait_model(source)
        logging.info("FlashPortrait Model Loader: %s", report.replace("\n", "; "))
        return io.NodeOutput(model, ui={"text": [report]})


@dataclass(frozen=True)
class ModelSource:
    """The files and storage type a FlashPortrait MODEL was loaded from, so that device workers (window-parallel
    sampling) load the very same weights in their own processes."""

    wan_path: str | None  # None: the FlashPortrait file holds the whole DiT ('none' chosen)
    flashportrait_path: str
    weight_dtype: str
    wan_name: str
    flashportrait_name: str


SOURCE_ATTRIBUTE = "flashportrait_source"  # on the ModelPatcher's BaseModel, which LoRA clones share


def load_flashportrait_model(source: ModelSource) -> tuple[comfy.model_patcher.ModelPatcher, str]:
    """A ModelPatcher of Wan 2.1 I2V with the FlashPortrait weights, emotion projections and block patches, read
    tensor by tensor, and the loader's report (which files were read, how, in which dtype)."""
    wan_model, flashportrait_weights = source.wan_name, source.flashportrait_name
    with contextlib.ExitStack() as files:
        fp = files.enter_context(open_checkpoint(source.flashportrait_path))
        fp_meta = fp.meta()
        base = None
        if source.wan_path is not None and not flashportrait_holds_complete_dit(fp_meta):
            base = files.enter_context(open_checkpoint(source.wan_path))
        layout = plan_flashportrait_dit(fp_meta, base.meta() if base else None, wan_name=wan_model,
                                        flashportrait_name=flashportrait_weights,
                                        wan_metadata=base.metadata if base else None,
                                        flashportrait_metadata=fp.metadata)
        readers = {FLASHPORTRAIT: fp, **({BASE: base} if base else {})}
        loaded = build_flashportrait_model(layout, readers, dict(_WEIGHT_DTYPES[source.weight_dtype]),
                                           wan_name=wan_model if base else flashportrait_weights)
    lines = [layout.describe(wan_model, flashportrait_weights)
             + (f" ({wan_model} in wan_model was not read)" if layout.complete and wan_model != NO_WAN_BASE
                else ""),
             loaded.storage,
             "read lazily: " + "; ".join(f"{name}: {reader.access}" for name, reader in
                                         ((flashportrait_weights, fp), (wan_model, base)) if reader)]
    if loaded.unused:
        lines.append(f"weights of the files that the Wan model has no place for: {_ignored_keys_note(loaded.unused)}")
    setattr(loaded.model.model, SOURCE_ATTRIBUTE, source)
    return loaded.model, "\n".join(lines)


def model_source(model_patcher) -> ModelSource | None:
    """Where a MODEL from FlashPortrait Model Loader came from; None for a model loaded otherwise."""
    return getattr(getattr(model_patcher, "model", None), SOURCE_ATTRIBUTE, None)


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
        path = model_file(WEIGHTS_FOLDER, portrait_encoder)
        state_dict, ignored = split_portrait_encoder_keys(load_state_dict(path))
        try:
            encoder = load_portrait_encoder(state_dict)
        except ValueError as error:
            raise CheckpointError(f"{portrait_encoder}: {error}") from None
        report = f"{portrait_encoder}: portrait encoder, {encoder.config.tokens_per_frame} tokens of " \
                 f"{encoder.config.output_dim} per frame"
        if ignored:
            # The published loader keeps only the three encoder prefixes; other keys are skipped, as there.
            report += f"; keys outside proj_model./mouth_proj_model./emo_proj_model.: {_ignored_keys_note(ignored)}"
            logging.info("FlashPortrait Portrait Encoder Loader: %s", report)
        return io.NodeOutput(encoder.float(), ui={"text": [report]})


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
        state_dict = load_state_dict(model_file(WEIGHTS_FOLDER, expression_encoder))
        try:
            encoder = load_fan_encoder(state_dict)
        except ValueError as error:
            raise CheckpointError(f"{expression_encoder}: {error}") from None
        return io.NodeOutput(ExpressionModel(encoder=encoder.float().eval(), face_backend=face_backend,
                                             backend=backend))
