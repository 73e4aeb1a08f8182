"""Performance edits: per-component strength / pose lock / relative motion, two performances combined, retiming.

Expressions in, expressions out, no model (except one frame of extraction when the reference portrait's own
features are asked for); the emotion conditioning and the sampler take the result unchanged.
"""
from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.edit import (FIRST_FRAME, LENGTH_MODES, LOOP_MODES, NEUTRALS, REFERENCE,
                                                  change_speed, combine, lock_head_pose, scale_components, trim)
from ..flashportrait_core.expression.edit import loop as loop_performance
from ..flashportrait_core.expression.extract import extract_expression_features
from ..flashportrait_core.expression.performance_file import describe
from ..flashportrait_core.validation import InputError, require_image_batch
from . import types
from .expressions import _Extraction
from .widget_checks import widget_problem

MAX_STRENGTH_WIDGET = 4.0
STRENGTH_TOOLTIP = ("Strength of the {what}: 0 holds it still at the neutral value, 1 keeps it as driven, above 1 "
                    "exaggerates it.")
COMPONENT_INPUTS = {"head_pose": "head pose (6 values: rotation and position)", "eyes": "eye motion (gaze, blinks)",
                    "emotion": "emotion (30 values)", "mouth": "mouth (512 values: lips and jaw)"}


class _FaceSeen:
    """The face backend, noting whether it found a face: extraction's own error speaks of driving frames."""

    def __init__(self, backend) -> None:
        self.backend, self.found = backend, False

    def detect(self, frames, reset: bool = True):
        track = self.backend.detect(frames, reset=reset)
        self.found |= bool(track.found.any())
        return track


def reference_features(expression_model, reference_image: torch.Tensor) -> torch.Tensor:
    """The reference portrait's own expression features [554], extracted with the same model and face backend
    as the driving video (first image of the batch)."""
    require_image_batch("reference_image", reference_image)
    with _Extraction(expression_model, 1) as run:
        backend = _FaceSeen(run.backend)
        try:
            result = extract_expression_features(reference_image[:1], run.encoder, backend, batch_size=1,
                                                 smoothing=0.0, on_progress=run.on_progress,
                                                 should_stop=run.should_stop)
        except ValueError:
            if backend.found:
                raise
            raise InputError(f"no face found in reference_image by {run.choice.description}; use a portrait with the "
                             "face clearly visible, or choose a neutral from the driving video") from None
    return result.features[0]


class FlashPortraitEditExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitEditExpressions",
            display_name="FlashPortrait Edit Expressions",
            category="FlashPortrait",
            description="Scales head pose, eyes, emotion and mouth of a driving performance separately around a "
                        "neutral value, locks the head pose to the reference portrait, or applies the driving "
                        "motion relative to its first frame onto the reference portrait's own expression. Output "
                        "goes to Emotion Conditioning like extracted expressions.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="From FlashPortrait Extract Expressions (or Load, "
                                                               "Combine or Retime Expressions)."),
                io.Combo.Input("neutral", options=list(NEUTRALS), default=FIRST_FRAME,
                               tooltip="The value each strength is measured around (and held at, at strength 0): "
                                       "the driving video's first frame, its mean over time, or the reference "
                                       "portrait's own features (needs reference_image and expression_model)."),
                *[io.Float.Input(name, default=1.0, min=0.0, max=MAX_STRENGTH_WIDGET, step=0.05,
                                 tooltip=STRENGTH_TOOLTIP.format(what=what))
                  for name, what in COMPONENT_INPUTS.items()],
                io.Boolean.Input("relative_motion", default=False,
                                 tooltip="Apply the driving video's changes since its first frame onto the reference "
                                         "portrait's own expression (frame t = reference + strength x (driving t - "
                                         "driving first frame)), so a driver with another resting face does not "
                                         "impose it. Overrides neutral; needs reference_image and expression_model."),
                io.Boolean.Input("pose_lock", default=False,
                                 tooltip="Keep the reference portrait's head pose in every frame: only the face "
                                         "moves. Needs reference_image and expression_model."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="The portrait being animated (the sampler's reference_image); its features "
                                       "are extracted once with expression_model."),
                types.ExpressionModel.Input("expression_model", optional=True,
                                            tooltip="The expression model that extracted the driving expressions."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.String.Output(display_name="report", tooltip="Frames, source and every edit applied so far."),
            ],
        )

    @classmethod
    def execute(cls, expressions, neutral: str, head_pose: float, eyes: float, emotion: float, mouth: float,
                relative_motion: bool, pose_lock: bool, reference_image: torch.Tensor | None = None,
                expression_model=None) -> io.NodeOutput:
        strengths = {"head_pose": head_pose, "eyes": eyes, "emotion": emotion, "mouth": mouth}
        wanted = [reason for reason, on in (("relative_motion", relative_motion), ("pose_lock", pose_lock),
                                            (f"neutral '{REFERENCE}'", neutral == REFERENCE and not relative_motion
                                             and any(value != 1.0 for value in strengths.values())))
                  if on]
        reference = None
        if wanted:
            if reference_image is None or expression_model is None:
                missing = " and ".join(name for name, value in (("reference_image", reference_image),
                                                                ("expression_model", expression_model))
                                       if value is None)
                raise InputError(f"{', '.join(wanted)} needs the reference portrait's features: connect {missing} "
                                 "(the portrait the sampler animates and the expression model that extracted the "
                                 "driving video)")
            reference = reference_features(expression_model, reference_image)
        comfy.model_management.throw_exception_if_processing_interrupted()
        edited = scale_components(expressions, strengths, neutral, reference, relative_motion)
        if pose_lock:
            edited = lock_head_pose(edited, reference)
        return io.NodeOutput(edited, describe(edited))


class FlashPortraitCombineExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitCombineExpressions",
            display_name="FlashPortrait Combine Expressions",
            category="FlashPortrait",
            description="Builds one performance from two: each component (head pose, eyes, emotion, mouth) from "
                        "the first or the second, e.g. the mouth of a talking clip with the eyes and pose of "
                        "another. The second is converted to the first's frame rate; lengths are reconciled as "
                        "chosen and the report says how.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="The first performance (its face track is kept)."),
                types.Expressions.Input("second", tooltip="The second performance."),
                *[io.Combo.Input(name, options=["first", "second"], default="second" if name == "mouth" else "first",
                                 tooltip=f"Which performance gives the {what}.")
                  for name, what in COMPONENT_INPUTS.items()],
                io.Combo.Input("lengths", options=list(LENGTH_MODES), default="trim",
                               tooltip="When the two differ in length: trim both to the shorter; or bring the shorter "
                                       "to the longer one's length by repeating it from its start (loop), playing it "
                                       "forth and back (ping-pong) or holding its last frame (hold)."),
                io.Int.Input("second_offset", default=0, min=-1_000_000, max=1_000_000,
                             tooltip="Shift the second performance in frames (after the rate conversion): positive "
                                     "delays it (its first frame is held), negative skips its first frames."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.String.Output(display_name="report", tooltip="What came from where and how lengths were "
                                                                "reconciled."),
            ],
        )

    @classmethod
    def execute(cls, expressions, second, head_pose: str, eyes: str, emotion: str, mouth: str, lengths: str,
                second_offset: int = 0) -> io.NodeOutput:
        take = {"head_pose": head_pose, "eyes": eyes, "emotion": emotion, "mouth": mouth}
        combined, reconciled = combine(expressions, second, take, lengths, second_offset)
        return io.NodeOutput(combined, f"{describe(combined)}\n{reconciled}")


class FlashPortraitRetimeExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitRetimeExpressions",
            display_name="FlashPortrait Retime Expressions",
            category="FlashPortrait",
            description="Trims a performance, changes its speed (resampled in time as the extractor converts frame "
                        "rates) and loops a short clip to a longer length. Applied in that order.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="The performance to retime."),
                io.Int.Input("start_frame", default=0, min=0, max=10_000_000,
                             tooltip="First frame kept (0 = from the start)."),
                io.Int.Input("frame_count", default=0, min=0, max=10_000_000,
                             tooltip="Frames kept from start_frame (0 = to the end)."),
                io.Float.Input("speed", default=1.0, min=0.1, max=10.0, step=0.05,
                               tooltip="Playback speed at the same frame rate: 2 = twice as fast (half the "
                                       "frames), 0.5 = half speed (twice the frames)."),
                io.Combo.Input("loop", options=["off", *LOOP_MODES], default="off",
                               tooltip="Repeat the (trimmed, retimed) clip up to loop_frames: ping-pong plays it "
                                       "forth and back with no jump; repeat starts over from its first frame."),
                io.Int.Input("loop_frames", default=0, min=0, max=10_000_000,
                             tooltip="Length after looping, in frames (e.g. 25 x seconds at 25 fps); needed when "
                                     "loop is on."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.Int.Output(display_name="frame_count", tooltip="Frames in the retimed performance."),
                io.String.Output(display_name="report", tooltip="Frames, source and every edit applied so far."),
            ],
        )

    @classmethod
    def validate_inputs(cls, loop: str = "off", loop_frames: int = 0) -> bool | str:
        problem = widget_problem(cls, loop=loop, loop_frames=loop_frames)
        if problem:
            return problem
        if loop != "off" and loop_frames < 1:
            return f"loop '{loop}' needs loop_frames: set the length of the looped performance in frames"
        return True

    @classmethod
    def execute(cls, expressions, start_frame: int, frame_count: int, speed: float, loop: str = "off",
                loop_frames: int = 0) -> io.NodeOutput:
        retimed = change_speed(trim(expressions, start_frame, frame_count), speed)
        if loop != "off":
            retimed = loop_performance(retimed, loop_frames, loop)
        return io.NodeOutput(retimed, int(retimed.features.shape[0]), describe(retimed))
