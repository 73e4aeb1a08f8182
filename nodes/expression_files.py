"""Save / Load Expressions: a driving performance as a small file in models/flashportrait_expressions."""
from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..flashportrait_core.expression.performance_file import describe, free_path, load_performance, save_performance
from . import types
from .expressions import video_fingerprint
from .model_folders import EXPRESSIONS_FOLDER, model_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def check_name(name: str) -> str:
    """A plain file name (no folders, no extension needed) for the saved performance."""
    name = (name or "").strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or name.endswith("."):
        raise ValueError(f"name {name!r} must be a plain file name of up to 100 letters, digits, spaces, '.', '_' "
                         "or '-' (no folders), starting with a letter or digit, e.g. 'talking_take2'")
    return name


class FlashPortraitSaveExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitSaveExpressions",
            display_name="FlashPortrait Save Expressions",
            category="FlashPortrait",
            description="Saves a performance (the expression features with their frame rate, source, face backend "
                        "and the edits applied) as a small safetensors file in models/flashportrait_expressions. "
                        "Load Expressions brings it back without the expression model or a face backend.",
            inputs=[
                types.Expressions.Input("expressions", tooltip="From Extract, Edit, Combine or Retime Expressions."),
                io.String.Input("name", default="performance",
                                tooltip="File name in models/flashportrait_expressions (.safetensors is added). An "
                                        "existing file is never replaced: a counter is added instead."),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="Name of the written file, as Load Expressions "
                                                                   "lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, expressions, name: str) -> io.NodeOutput:
        folder = folder_paths.get_folder_paths(EXPRESSIONS_FOLDER)[0]
        path = save_performance(free_path(folder, check_name(name)), expressions)
        text = f"saved {path.name}: {describe(expressions)}"
        return io.NodeOutput(path.name, ui=ui.PreviewText(text))


class FlashPortraitLoadExpressions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitLoadExpressions",
            display_name="FlashPortrait Load Expressions",
            category="FlashPortrait",
            description="Loads a performance saved by Save Expressions: no expression model and no face backend "
                        "needed, so a shared workflow plus this file reproduces the emotion conditioning.",
            inputs=[
                io.Combo.Input("expressions_file", options=folder_paths.get_filename_list(EXPRESSIONS_FOLDER),
                               tooltip="A file in models/flashportrait_expressions (press R after adding files)."),
            ],
            outputs=[
                types.Expressions.Output(display_name="expressions"),
                io.Float.Output(display_name="fps", tooltip="Frame rate of the performance."),
                io.Int.Output(display_name="frame_count", tooltip="Frames in the performance."),
                io.String.Output(display_name="report", tooltip="Frames, source, face backend and edits."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, expressions_file: str) -> str:
        # A file replaced under the same name is read again; a missing one is reported when the node runs.
        try:
            return video_fingerprint(model_file(EXPRESSIONS_FOLDER, expressions_file))
        except FileNotFoundError:
            return expressions_file

    @classmethod
    def execute(cls, expressions_file: str) -> io.NodeOutput:
        path = model_file(EXPRESSIONS_FOLDER, expressions_file)
        expressions = load_performance(path)
        return io.NodeOutput(expressions, float(expressions.fps), int(expressions.features.shape[0]),
                             f"{os.path.basename(path)}: {describe(expressions)}")
