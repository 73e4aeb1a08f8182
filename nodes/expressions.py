"""Expression extraction node: driving frames -> per-frame PD-FGC features."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.extract import extract_expression_features
from ..flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from . import types


class FlashPortraitExtractExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitExtractExpressions",
            display_name="FlashPortrait Extract Expressions",
            category="FlashPortrait",
            description="Finds the face in every driving frame, aligns it to the PD-FGC template and encodes "
                        "head pose, eyes, emotion and mouth (554 values per frame).",
            inputs=[
                io.Image.Input("driving_frames", tooltip="Frames of the driving video (e.g. from Load Video "
                                                         "+ Get Video Components)."),
                types.ExpressionModel.Input("expression_model", tooltip="From FlashPortrait Expression Model Loader."),
                io.Int.Input("batch_size", default=16, min=1, max=256,
                             tooltip="Faces encoded together; lower it if memory runs short."),
                io.Int.Input("max_frames", default=0, min=0, max=1_000_000,
                             tooltip="Use only the first N driving frames (0 = all), e.g. for a quick "
                                     "preview of a long video."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.String.Output(display_name="report", tooltip="Frames, faces found and frames filled."),
            ],
        )

    @classmethod
    def execute(cls, driving_frames: torch.Tensor, expression_model, batch_size: int,
                max_frames: int = 0) -> io.NodeOutput:
        if max_frames > 0:
            driving_frames = driving_frames[:max_frames]
        device = comfy.model_management.get_torch_device()
        encoder = expression_model.encoder.to(device)
        progress = comfy.utils.ProgressBar(driving_frames.shape[0])
        try:
            with MediaPipeFaceBackend() as backend:
                expressions = extract_expression_features(
                    driving_frames, encoder, backend, batch_size=batch_size,
                    on_progress=lambda done, total: progress.update_absolute(done, total),
                    should_stop=comfy.model_management.throw_exception_if_processing_interrupted)
        finally:
            expression_model.encoder.to(comfy.model_management.unet_offload_device())
        total = expressions.features.shape[0]
        filled = expressions.filled_frames
        report = (f"{total} frames, face found in {total - len(filled)}, "
                  f"{len(filled)} filled by interpolation" + (f": {filled[:20]}" if filled else ""))
        return io.NodeOutput(expressions, report)
