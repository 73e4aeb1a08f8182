"""ComfyUI's own widget checks for the inputs a node's ``validate_inputs`` names.

ComfyUI skips its min / max / list checks for every input named in a node's ``validate_inputs`` (it leaves them to
the node), so a node that validates some widgets runs these first, with ComfyUI's wording.
"""
from __future__ import annotations

from comfy_api.latest import io


def widget_problem(node: type[io.ComfyNode], **values) -> str | None:
    """The first of ``values`` (widget name -> value) outside its input's options or range, as ComfyUI would name
    it; None when all are within."""
    inputs = {spec.id: spec for spec in node.define_schema().inputs}
    for name, value in values.items():
        spec = inputs[name]
        options = getattr(spec, "options", None)
        if options is not None and value not in options:
            shown = options if len(options) <= 20 else f"a list of {len(options)}"
            return f"{name}: '{value}' not in {shown}"
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if low is not None and value < low:
            return f"{name}: value {value} smaller than min of {low}"
        if high is not None and value > high:
            return f"{name}: value {value} bigger than max of {high}"
    return None
