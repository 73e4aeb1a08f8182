"""Expression extraction nodes: driving frames or a video file -> per-frame PD-FGC features; previews."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.extract import (extract_expression_features,
                                                     extract_expression_features_from_video)
from ..flashportrait_core.expression.preview import (draw_face_overlay, face_tracks_for_frames,
                                                     landmarks_for_frames, plot_expression_curves)
from . import types
from .loaders import resolve_backend

SMOOTHING_TOOLTIP = ("Temporal smoothing of the face points (one-euro filter, run forward and backward so it adds "
                     "no delay): 0 = off, 1 = strongest. Steadies the face crop on a still head while fast "
                     "motion still passes. Not used with the flashportrait face backend, whose points come "
                     "smoothed by the published landmark filter.")


def smoothing_input() -> io.Float.Input:
    return io.Float.Input("smoothing", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=SMOOTHING_TOOLTIP)


class _Extraction:
    """Runs one extraction with the expression model on ComfyUI's device, with its face backend, progress and
    interruption."""

    def __init__(self, expression_model, total_frames: int) -> None:
        self.model = expression_model
        self.progress = comfy.utils.ProgressBar(max(total_frames, 1))
        self.choice = expression_model.backend or resolve_backend(expression_model.face_backend)

    def __enter__(self) -> _Extraction:
        device = comfy.model_management.get_torch_device()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        self.backend = self.choice.create(providers=providers)
        self.encoder = self.model.encoder.to(device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.model.encoder.to(comfy.model_management.unet_offload_device())
        self.backend.close()

    def report(self, expressions) -> str:
        return f"{expressions.report()}; faces: {self.choice.description}"

    def label(self, expressions):
        """The expressions with the face backend that found them recorded (kept when they are saved)."""
        expressions.face_backend = self.choice.description
        return expressions

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
                             tooltip="Faces encoded together; lower it if memory runs short. On a GPU larger "
                                     "batches run faster (64: 1.1x end to end on an H200)."),
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
        with _Extraction(expression_model, driving_frames.shape[0]) as run:
            expressions = extract_expression_features(
                driving_frames, run.encoder, run.backend, batch_size=batch_size, smoothing=smoothing,
                fps=float(fps) if fps else 25.0, on_progress=run.on_progress, should_stop=run.should_stop)
            run.label(expressions)
        return io.NodeOutput(expressions, run.report(expressions))


def input_videos() -> list[str]:
    """Video files in ComfyUI's input folder (as core Load Video lists them)."""
    folder = folder_paths.get_input_directory()
    files = [name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name))]
    return sorted(folder_paths.filter_files_content_types(files, ["video"]))


def resolve_video_path(video: str | None, path: str | None) -> str:
    """The driving video to read: `path` when given (absolute, or relative to the input folder), else the
    input-folder file chosen in `video`. A clear FileNotFoundError names what was looked for."""
    typed = (path or "").strip().strip('"').strip("'")
    if typed:
        candidate = os.path.expanduser(typed)
        if not os.path.isabs(candidate):
            candidate = os.path.join(folder_paths.get_input_directory(), candidate)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(f"driving video path '{typed}' does not exist (looked for {candidate}); "
                                    "give the full path of a video file, or clear it to use the video list")
        return candidate
    if not video:
        raise FileNotFoundError(f"no driving video chosen: put a video in ComfyUI's input folder "
                                f"({folder_paths.get_input_directory()}) or upload one, or type its full path")
    if not folder_paths.exists_annotated_filepath(video):
        raise FileNotFoundError(f"driving video '{video}' is not in ComfyUI's input folder "
                                f"({folder_paths.get_input_directory()}); pick another or upload it")
    return folder_paths.get_annotated_filepath(video)


def video_fingerprint(file_path: str) -> str:
    """Changes when the file is replaced or edited: path, size and modification time (ns)."""
    status = os.stat(file_path)
    return f"{os.path.realpath(file_path)}|{status.st_size}|{status.st_mtime_ns}"


class FlashPortraitExtractExpressionsFromVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitExtractExpressionsFromVideo",
            display_name="FlashPortrait Extract Expressions (Video File)",
            category="FlashPortrait",
            description="Reads the driving video file in chunks (never all frames at once, so any length fits "
                        "in memory), finds and follows the face, and encodes its expressions. Optionally "
                        "converts the sequence to the generation frame rate.",
            inputs=[
                io.Combo.Input("video", options=input_videos(), upload=io.UploadType.video,
                               tooltip="A video in ComfyUI's input folder (upload adds one). Ignored when a "
                                       "path is given below."),
                types.ExpressionModel.Input("expression_model", tooltip="From FlashPortrait Expression Model Loader."),
                io.Int.Input("batch_size", default=16, min=1, max=256,
                             tooltip="Frames decoded and faces encoded together; lower it if memory runs short. "
                                     "On a GPU larger batches run faster (64: 1.1x end to end on an H200)."),
                io.Int.Input("max_frames", default=0, min=0, max=1_000_000,
                             tooltip="Use only the first N frames of the video (0 = all)."),
                smoothing_input(),
                io.Float.Input("target_fps", default=25.0, min=0.0, max=240.0, step=1.0,
                               tooltip="Frame rate of the generated video; the expression sequence is resampled "
                                       "to it (linear interpolation in time). 25 is the model's rate; 0 keeps "
                                       "the driving video's rate."),
                io.String.Input("path", default="", optional=True,
                                tooltip="Full path of a video file anywhere on disk (overrides the list above); "
                                        "a relative path is looked up in the input folder."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the expression sequence (the "
                                                           "target fps, or the video's when kept)."),
                io.Int.Output(display_name="frame_count", tooltip="Frames in the expression sequence."),
                io.String.Output(display_name="report", tooltip="Frames, frame rates, faces found and frames "
                                                                "filled."),
            ],
        )

    @classmethod
    def validate_inputs(cls, video: str | None = None, path: str | None = None) -> bool | str:
        try:
            resolve_video_path(video, path)
        except FileNotFoundError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, video: str | None = None, path: str | None = None, **settings) -> str:
        # Same file and settings: ComfyUI reuses the cached output. An edited or replaced file re-runs.
        return video_fingerprint(resolve_video_path(video, path))

    @classmethod
    def execute(cls, video: str | None, expression_model, batch_size: int, max_frames: int = 0,
                smoothing: float = 0.5, target_fps: float = 25.0, path: str | None = None) -> io.NodeOutput:
        file_path = resolve_video_path(video, path)
        # The progress total is set by the first update, from the container's frame count.
        with _Extraction(expression_model, 1) as run:
            expressions = extract_expression_features_from_video(
                file_path, run.encoder, run.backend, batch_size=batch_size, smoothing=smoothing,
                max_frames=max_frames or None, target_fps=target_fps or None,
                on_progress=run.on_progress, should_stop=run.should_stop)
            run.label(expressions)
        return io.NodeOutput(expressions, float(expressions.fps), int(expressions.features.shape[0]),
                             f"{os.path.basename(file_path)}: {run.report(expressions)}")


class FlashPortraitPreviewFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitPreviewFaces",
            display_name="FlashPortrait Preview Faces",
            category="FlashPortrait",
            description="Draws the face box and the 5 alignment points over the driving frames, so you can see "
                        "whether the face was followed: green box = detected, orange = interpolated. The face "
                        "backend's landmarks are drawn too (cyan): FlashPortrait's 222 points (flashportrait), "
                        "MediaPipe's 478-point face mesh, or insightface's 106 points when the pack has "
                        "2d106det.onnx.",
            inputs=[
                io.Image.Input("driving_frames", tooltip="The driving frames the expressions were extracted from "
                                                         "(the first N are drawn; a resized copy works too)."),
                types.Expressions.Input("expressions", tooltip="From a FlashPortrait Extract Expressions node."),
                io.Boolean.Input("draw_landmarks", default=True, optional=True,
                                 tooltip="Also draw the face backend's dense landmarks where it has them "
                                         "(flashportrait: 222 points; MediaPipe's 478-point face mesh; "
                                         "insightface's 106 points when the pack has 2d106det.onnx, none "
                                         "otherwise)."),
            ],
            outputs=[io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, driving_frames: torch.Tensor, expressions, draw_landmarks: bool = True) -> io.NodeOutput:
        count, height, width = driving_frames.shape[:3]
        boxes, points, found = face_tracks_for_frames(expressions, count, height, width)
        # Expressions made before dense landmarks were kept have no such field.
        landmarks = (landmarks_for_frames(expressions, count, height, width)
                     if draw_landmarks and getattr(expressions, "landmarks", None) is not None else None)
        return io.NodeOutput(draw_face_overlay(driving_frames, boxes, points, found, landmarks))


class FlashPortraitPlotExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitPlotExpressions",
            display_name="FlashPortrait Plot Expressions",
            category="FlashPortrait",
            description="Plots the expression features over time (head pose, eyes, the most varying emotion "
                        "dimensions, mouth energy) as an image; interpolated frames are shaded.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="From a FlashPortrait Extract Expressions node."),
                io.Int.Input("width", default=1280, min=320, max=4096, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=960, min=240, max=4096, step=8, tooltip="Image height in pixels."),
            ],
            outputs=[io.Image.Output(display_name="plot")],
        )

    @classmethod
    def execute(cls, expressions, width: int = 1280, height: int = 960) -> io.NodeOutput:
        image = plot_expression_curves(expressions, width, height)
        return io.NodeOutput(torch.from_numpy(image).float().div_(255.0).unsqueeze(0))
