"""Expression extraction nodes: driving frames or a video file -> per-frame PD-FGC features; previews."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.extract import ExpressionFeatures, extract_expression_features
from ..flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend
from . import types

SMOOTHING_TOOLTIP = ("Temporal smoothing of the face points (one-euro filter, run forward and backward so it adds "
                     "no delay): 0 = off, 1 = strongest. Steadies the face crop on a still head while fast "
                     "motion still passes.")


def smoothing_input() -> io.Float.Input:
    return io.Float.Input("smoothing", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=SMOOTHING_TOOLTIP)


class _Extraction:
    """Runs one extraction with the expression model on ComfyUI's device, with progress and interruption."""

    def __init__(self, expression_model, total_frames: int) -> None:
        self.model = expression_model
        self.progress = comfy.utils.ProgressBar(max(total_frames, 1))

    def __enter__(self) -> _Extraction:
        self.encoder = self.model.encoder.to(comfy.model_management.get_torch_device())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.model.encoder.to(comfy.model_management.unet_offload_device())

    def on_progress(self, done: int, total: int) -> None:
        self.progress.update_absolute(done, total)

    @staticmethod
    def should_stop() -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()


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
                smoothing_input(),
                io.Float.Input("fps", default=25.0, min=1.0, max=240.0, optional=True, force_input=True,
                               tooltip="Frame rate of the driving frames (e.g. from Get Video Components); "
                                       "sets the smoothing's time scale. 25 when not connected."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.String.Output(display_name="report", tooltip="Frames, faces found and frames filled."),
            ],
        )

    @classmethod
    def execute(cls, driving_frames: torch.Tensor, expression_model, batch_size: int, max_frames: int = 0,
                smoothing: float = 0.5, fps: float | None = None) -> io.NodeOutput:
        if max_frames > 0:
            driving_frames = driving_frames[:max_frames]
        with _Extraction(expression_model, driving_frames.shape[0]) as run, MediaPipeFaceBackend() as backend:
            expressions = extract_expression_features(
                driving_frames, run.encoder, backend, batch_size=batch_size, smoothing=smoothing,
                fps=float(fps) if fps else 25.0, on_progress=run.on_progress, should_stop=run.should_stop)
        return io.NodeOutput(expressions, expressions.report())
