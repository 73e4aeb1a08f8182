"""Window settings node: how the latent frames are split into overlapping context windows."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from . import types
from .widget_checks import widget_problem


@dataclass(frozen=True)
class WindowSettings:
    length: int  # latent frames per window
    overlap: int  # latent frames shared with the previous window


class FlashPortraitWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitWindows",
            display_name="FlashPortrait Windows",
            category="FlashPortrait",
            description="Sliding context windows for videos of any length, cross-faded linearly in the overlap "
                        "(published: 51 latent frames = 201 video frames, overlap 30).",
            inputs=[
                io.Int.Input("window_length", default=51, min=1, max=201,
                             tooltip="Latent frames per window (4 video frames each, +1 for the first). "
                                     "Longer windows need more memory."),
                io.Int.Input("overlap", default=30, min=0, max=200,
                             tooltip="Latent frames shared with the previous window; must be below the "
                                     "window length. More overlap is smoother and slower."),
            ],
            outputs=[types.WindowSettings.Output(display_name="windows")],
        )

    @classmethod
    def validate_inputs(cls, window_length: int, overlap: int) -> bool | str:
        problem = widget_problem(cls, window_length=window_length, overlap=overlap)
        if problem:
            return problem
        if overlap >= window_length:
            return (f"overlap ({overlap}) must be smaller than window_length ({window_length}): lower overlap to "
                    f"at most {window_length - 1} or raise window_length")
        return True

    @classmethod
    def execute(cls, window_length: int, overlap: int) -> io.NodeOutput:
        return io.NodeOutput(WindowSettings(window_length, overlap))
