"""FlashPortrait Evaluate: the drift monitor over an output video (frames or the written file, streamed)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..flashportrait_core.evaluation import (RecognitionModel, RecognitionModelNotFoundError, evaluate_output,
                                             evaluation_report, find_recognition_model, plot_evaluation,
                                             recognition_models)
from ..flashportrait_core.evaluation.identity import model_label
from ..flashportrait_core.expression.extract import check_frames, rgb_chunk
from ..flashportrait_core.expression.insightface_backend import InsightFaceUnavailableError
from ..flashportrait_core.expression.reference_check import image_to_uint8
from ..flashportrait_core.expression.video import iter_video_chunks, probe_video
from ..flashportrait_core.validation import InputError, require_image_batch
from . import types
from .expressions import _Extraction
from .loaders import insightface_roots


def recognition_choices() -> list[str]:
    return ["auto", *[model_label(path) for path in recognition_models(insightface_roots())]]


def allowed_folders() -> list[str]:
    return [folder_paths.get_output_directory(), folder_paths.get_input_directory(),
            folder_paths.get_temp_directory()]


def resolve_output_video(path: str) -> str:
    """The video file to evaluate: absolute, or relative to ComfyUI's output folder; it must lie inside ComfyUI's
    output, input or temp folder."""
    typed = path.strip().strip('"').strip("'")
    candidate = typed if os.path.isabs(typed) else os.path.join(folder_paths.get_output_directory(), typed)
    real = os.path.realpath(candidate)
    folders = [os.path.realpath(folder) for folder in allowed_folders()]
    if not any(os.path.commonpath([real, folder]) == folder for folder in folders):
        raise InputError(f"video_path '{typed}' is outside ComfyUI's output, input and temp folders; connect the "
                         "path output of FlashPortrait Decode to Video File, or give a file in the output folder")
    if not os.path.isfile(real):
        raise InputError(f"video_path '{typed}' does not exist (looked for {real}); connect the path output of "
                         "FlashPortrait Decode to Video File, or give a file name in the output folder")
    return real


def load_recognition_model(choice: str, providers: list[str] | None) -> tuple[RecognitionModel | None, str]:
    """The recognition model to use, or None and why identity is skipped."""
    try:
        return RecognitionModel(find_recognition_model(insightface_roots(), choice), providers), ""
    except RecognitionModelNotFoundError as error:
        return None, f"skipped: {error}"
    except InsightFaceUnavailableError:
        return None, ("skipped: the face-recognition model runs with onnxruntime: pip install onnxruntime (or "
                      "onnxruntime-gpu)")


class FlashPortraitEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitEvaluate",
            display_name="FlashPortrait Evaluate",
            category="FlashPortrait",
            description="Drift monitor for an output video: identity similarity of every frame's face to the "
                        "reference (with your insightface pack's recognition model), expression fidelity against "
                        "the driving performance (re-extracted with the same expression model), and seams where "
                        "sampling windows meet. Streams a video file: memory stays flat however long it is.",
            inputs=[
                io.Image.Input("reference_image", tooltip="The reference portrait the sampler animated."),
                types.Expressions.Input("driving_expressions",
                                        tooltip="The expressions given to Emotion Conditioning (after any edits)."),
                types.ExpressionModel.Input("expression_model",
                                            tooltip="The expression model that extracted the driving expressions; "
                                                    "its face backend also finds the faces for identity."),
                io.Image.Input("output_frames", optional=True,
                               tooltip="The output as frames (e.g. VAE Decode, reference frame dropped). Or give "
                                       "video_path."),
                io.String.Input("video_path", default="", optional=True,
                                tooltip="The written output video, read in chunks: connect the path output of "
                                        "FlashPortrait Decode to Video File, or give a file in the output folder."),
                types.WindowSettings.Input("windows", optional=True,
                                           tooltip="The window settings the sampler used, for the seam check."),
                io.Int.Input("driving_offset", default=1, min=0, max=1000,
                             tooltip="Driving frame shown by the first output frame: 1 when the reference frame "
                                     "was left out (Decode to Video File's default), 0 when it was kept."),
                io.Float.Input("identity_threshold", default=0.5, min=-1.0, max=1.0, step=0.01,
                               tooltip="Frames whose similarity to the reference falls below this are marked and "
                                       "listed (cosine of recognition embeddings; 1 = identical)."),
                io.Combo.Input("recognition_model", options=recognition_choices(), default="auto",
                               tooltip="Face-recognition model of an insightface pack in models/insightface: "
                                       "w600k_r50.onnx (buffalo_l) or glintr100.onnx (antelopev2). auto takes "
                                       "antelopev2, then buffalo_l. Without one, identity is skipped and the report "
                                       "says which file to add."),
                io.Int.Input("batch_size", default=16, min=1, max=256,
                             tooltip="Frames decoded and faces encoded together; lower it if memory runs short."),
                io.Int.Input("plot_width", default=1280, min=320, max=4096, step=8, tooltip="Plot width in pixels."),
                io.Int.Input("plot_height", default=960, min=240, max=4096, step=8,
                             tooltip="Plot height in pixels."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="Similarity, expression errors and frame-to-frame "
                                                             "change over time; window boundaries dashed."),
                io.String.Output(display_name="report", tooltip="Each measure and the worst stretches."),
            ],
        )

    @classmethod
    def execute(cls, reference_image: torch.Tensor, driving_expressions, expression_model,
                output_frames: torch.Tensor | None = None, video_path: str | None = "", windows=None,
                driving_offset: int = 1, identity_threshold: float = 0.5, recognition_model: str = "auto",
                batch_size: int = 16, plot_width: int = 1280, plot_height: int = 960) -> io.NodeOutput:
        require_image_batch("reference_image", reference_image)
        typed_path = (video_path or "").strip()
        if (output_frames is None) == (not typed_path):
            raise InputError("give the output either as output_frames or as video_path (connect one of them: "
                             + ("both are connected" if typed_path else "neither is") + ")")
        if typed_path:
            path = resolve_output_video(typed_path)
            info = probe_video(path)
            fps, expected = info.fps, info.frame_count

            def passes() -> Iterator[torch.Tensor]:
                for chunk in iter_video_chunks(path, batch_size):
                    yield torch.from_numpy(chunk)
        else:
            check_frames(output_frames)
            fps, expected = float(driving_expressions.fps), output_frames.shape[0]

            def passes() -> Iterator[torch.Tensor]:
                for start in range(0, expected, batch_size):
                    yield rgb_chunk(output_frames, start, min(start + batch_size, expected))

        window_settings = None if windows is None else (windows.length, windows.overlap)
        with _Extraction(expression_model, expected) as run:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
                if comfy.model_management.get_torch_device().type == "cuda" else None
            recognition, identity_note = load_recognition_model(recognition_model, providers)
            evaluation = evaluate_output(
                passes, expected, fps, driving_expressions, run.encoder, run.backend,
                reference_image=image_to_uint8(reference_image), recognition=recognition,
                identity_note=identity_note, windows=window_settings, driving_offset=driving_offset,
                threshold=identity_threshold, on_progress=run.on_progress, should_stop=run.should_stop)
        report = evaluation_report(evaluation)
        extracted_with = (driving_expressions.face_backend or "").split(" ")[0].strip(",")
        if extracted_with and extracted_with != run.choice.name:
            report += (f"\nthe driving expressions were extracted with {extracted_with} faces, this evaluation finds "
                       f"them with {run.choice.name}: use the same expression model for an exact comparison")
        if typed_path:
            report = f"{os.path.basename(path)}: {report}"
        logging.info("FlashPortrait Evaluate: %s", report)
        plot = plot_evaluation(evaluation, plot_width, plot_height)
        return io.NodeOutput(torch.from_numpy(plot).float().div_(255.0).unsqueeze(0), report)

