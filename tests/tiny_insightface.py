"""Tiny insightface-format ONNX files for the backend's tests: an SCRFD detector whose answer is set by the test,
and a 106-point landmark model with chosen weights.

The files have the published models' interface (input layout and size, number, order and shapes of outputs), so
the backend runs them through onnxruntime exactly as it runs a real pack; what they compute is simple enough
that a test knows the right answer in frame pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCRFD_INPUT = 640
STRIDES = (8, 16, 32)
LANDMARK_INPUT = 192
LANDMARK_VALUES = 212  # 106 points x (x, y)
OPSET = 17


@dataclass(frozen=True)
class PlantedFace:
    """One detection the tiny SCRFD reports: an anchor of stride 8 and its predicted distances (in strides)."""

    row: int
    column: int
    score: float
    box_distances: tuple[float, float, float, float]  # left, top, right, bottom of the anchor centre
    point_offsets: tuple[float, ...] = (-1, -1, 1, -1, 0, 0, -1, 1, 1, 1)  # 5 (x, y) from the anchor centre

    def anchor_centre(self) -> np.ndarray:
        return np.array([self.column * 8, self.row * 8], dtype=np.float64)

    def box_in_input(self) -> np.ndarray:
        left, top, right, bottom = (8 * d for d in self.box_distances)
        x, y = self.anchor_centre()
        return np.array([x - left, y - top, x + right, y + bottom])

    def points_in_input(self) -> np.ndarray:
        return self.anchor_centre() + 8 * np.asarray(self.point_offsets, dtype=np.float64).reshape(5, 2)


def save_onnx(graph, path: Path) -> Path:
    """``graph`` as a checked ONNX model file at ``path`` (opset 17, IR 8: what onnxruntime here reads)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_scrfd(path: Path, faces: list[PlantedFace]) -> Path:
    """An SCRFD-layout detector (input `input.1` [1, 3, 640, 640]; scores, boxes, points per stride 8/16/32)
    that reports `faces` whatever the frame. Its outputs still depend on the input (times zero), as a network's do."""
    from onnx import TensorProto, helper, numpy_helper

    counts = [(SCRFD_INPUT // stride) ** 2 * 2 for stride in STRIDES]
    scores = [np.zeros((count, 1), np.float32) for count in counts]
    boxes = [np.zeros((count, 4), np.float32) for count in counts]
    points = [np.zeros((count, 10), np.float32) for count in counts]
    for face in faces:
        anchor = (face.row * (SCRFD_INPUT // 8) + face.column) * 2
        scores[0][anchor] = face.score
        boxes[0][anchor] = face.box_distances
        points[0][anchor] = face.point_offsets
    constants = scores + boxes + points
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["mean"], keepdims=0, name="ReduceMean_0"),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"], name="Mul_1")]
    outputs, initializers = [], [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    for index, constant in enumerate(constants):
        initializers.append(numpy_helper.from_array(constant, f"planted_{index}"))
        nodes.append(helper.make_node("Add", [f"planted_{index}", "nothing"], [f"out_{index}"], name=f"Add_{index}"))
        outputs.append(helper.make_tensor_value_info(f"out_{index}", TensorProto.FLOAT, list(constant.shape)))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])], outputs, initializers)
    return save_onnx(graph, path)


def write_landmark_model(path: Path, weight: np.ndarray, bias: np.ndarray, normalises_input: bool) -> Path:
    """A 2d106det-layout model (input `data` [N, 3, 192, 192], output `fc1` [N, 212]): the crop's mean colour per
    channel (of the normalised input) times `weight` [3, 212] plus `bias` [212].

    With `normalises_input` the graph begins by computing (x - 127.5) / 128 itself (nodes `Sub_0`, `Mul_1`, as in
    the published file) and expects raw 0-255 pixels; without it, it expects the caller to normalise."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = [numpy_helper.from_array(weight.astype(np.float32), "weight"),
                    numpy_helper.from_array(bias.astype(np.float32), "bias")]
    nodes = []
    source = "data"
    if normalises_input:
        initializers += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                         numpy_helper.from_array(np.array(1 / 128, np.float32), "inverse_std")]
        nodes += [helper.make_node("Sub", ["data", "mean"], ["centred"], name="Sub_0"),
                  helper.make_node("Mul", ["centred", "inverse_std"], ["normalised"], name="Mul_1")]
        source = "normalised"
    nodes += [helper.make_node("GlobalAveragePool", [source], ["pooled"], name="GlobalAveragePool_2"),
              helper.make_node("Flatten", ["pooled"], ["colour"], name="Flatten_3"),
              helper.make_node("Gemm", ["colour", "weight", "bias"], ["fc1"], name="Gemm_4")]
    graph = helper.make_graph(
        nodes, "tiny_2d106det",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, LANDMARK_INPUT, LANDMARK_INPUT])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", LANDMARK_VALUES])], initializers)
    return save_onnx(graph, path)
