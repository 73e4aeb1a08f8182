"""Tiny ONNX files in the layout of FlashPortrait's face files, for the flashportrait face backend's tests.

- `write_face_detector`: a `face_det.onnx` stand-in. Input `data` [1, 3, 272, 160] (the normalised BGR frame);
  outputs, in the published order, the score maps of strides 8, 16, 32 ([1, cells, 1]) and their distance logits
  ([1, cells, 32]: left, top, right, bottom, 8 bins each). A cell's score is
  sigmoid(w . input[:, row * stride, column * stride] + bias[row, column]): it reads the normalised pixel at its
  anchor, so where a face is found depends on the frame, its colour channels and its normalisation.
- `write_landmark_model`: a `face_landmark.onnx` stand-in. Input `input` [1, 3, 128, 128] (the BGR crop in
  [0, 1]); outputs the 444 landmark values (all x, then all y, as fractions of the crop), the Euler angles
  [1, 3] (pitch, yaw, roll; radians) and the face score [1, 1]. The landmarks are a template plus `follow` times the
  brightness centroid of the crop (as a fraction of the crop), so a landmark set can stay put or follow a bright
  blob; the score is the crop's brightest value times `score_gain` plus `score_bias`.

What they compute is simple enough that a test knows the right answer; their interface is the published files'.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DETECTOR_HEIGHT, DETECTOR_WIDTH = 272, 160
STRIDES = (8, 16, 32)
BINS = 8
CROP = 128
POINTS = 222
OPSET = 17


def grid(stride: int) -> tuple[int, int]:
    return math.ceil(DETECTOR_HEIGHT / stride), math.ceil(DETECTOR_WIDTH / stride)


def distance_logits(bins: tuple[float, float, float, float], sharpness: float = 4.0) -> np.ndarray:
    """32 logits whose softmax means are close to `bins` (left, top, right, bottom, in bins 0..7)."""
    centres = np.arange(BINS)
    return np.concatenate([-sharpness * (centres - value) ** 2 for value in bins]).astype(np.float32)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_face_detector(path: Path, channel_weights: tuple[float, float, float] = (0.0, 0.0, 0.0),
                        biases: dict[int, np.ndarray] | None = None,
                        logits: dict[int, np.ndarray] | None = None) -> Path:
    """`biases[stride]` [rows, columns] (default -10: no face) and `logits[stride]` [cells, 32] or [32]
    (default: 2 bins on every side)."""
    from onnx import TensorProto, helper, numpy_helper

    biases, logits = biases or {}, logits or {}
    initializers = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([DETECTOR_HEIGHT, DETECTOR_WIDTH], np.int64), "ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.asarray(channel_weights, np.float32).reshape(1, 3, 1, 1), "channel_weights"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [helper.make_node("ReduceMean", ["data"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    score_outputs, distance_outputs = [], []
    for stride in STRIDES:
        rows, columns = grid(stride)
        cells = rows * columns
        bias = np.asarray(biases.get(stride, np.full((rows, columns), -10.0)), np.float32).reshape(1, 1, rows, columns)
        level_logits = np.asarray(logits.get(stride, distance_logits((2, 2, 2, 2))), np.float32)
        level_logits = np.broadcast_to(level_logits, (cells, 4 * BINS)).reshape(1, cells, 4 * BINS)
        initializers += [
            numpy_helper.from_array(np.array([stride, stride], np.int64), f"steps_{stride}"),
            numpy_helper.from_array(bias, f"bias_{stride}"),
            numpy_helper.from_array(np.array([1, cells, 1], np.int64), f"score_shape_{stride}"),
            numpy_helper.from_array(np.ascontiguousarray(level_logits), f"logits_{stride}"),
        ]
        nodes += [
            helper.make_node("Slice", ["data", "starts", "ends", "axes", f"steps_{stride}"], [f"samples_{stride}"]),
            helper.make_node("Conv", [f"samples_{stride}", "channel_weights"], [f"mixed_{stride}"]),
            helper.make_node("Add", [f"mixed_{stride}", f"bias_{stride}"], [f"logit_{stride}"]),
            helper.make_node("Sigmoid", [f"logit_{stride}"], [f"map_{stride}"]),
            helper.make_node("Reshape", [f"map_{stride}", f"score_shape_{stride}"], [f"cls_pred_stride_{stride}"]),
            helper.make_node("Add", [f"logits_{stride}", "nothing"], [f"dis_pred_stride_{stride}"]),
        ]
        score_outputs.append(helper.make_tensor_value_info(f"cls_pred_stride_{stride}", TensorProto.FLOAT,
                                                           [1, cells, 1]))
        distance_outputs.append(helper.make_tensor_value_info(f"dis_pred_stride_{stride}", TensorProto.FLOAT,
                                                              [1, cells, 4 * BINS]))
    graph = helper.make_graph(
        nodes, "tiny_face_det",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, DETECTOR_HEIGHT, DETECTOR_WIDTH])],
        score_outputs + distance_outputs, initializers)
    return _save(graph, path)


def face_template(angle_degrees: float = 0.0, seed: int = 0) -> np.ndarray:
    """222 landmarks [222, 2] as fractions of the crop: a face whose box spans 0.85 of the crop (height) centred
    on it, eye corners 74 and 96 level, the five alignment points where a face has them. Turned by
    `angle_degrees` about the centre (counter-clockwise on screen)."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-0.33, 0.33, size=(POINTS, 2))
    named = {0: (-0.35, 0.0), 32: (0.35, 0.0), 8: (0.0, -0.425), 16: (0.0, 0.425),
             74: (-0.22, -0.15), 96: (0.22, -0.15), 182: (-0.12, -0.15), 202: (0.12, -0.15),
             36: (0.0, 0.03), 149: (-0.1, 0.2), 133: (0.1, 0.2)}
    for index, position in named.items():
        points[index] = position
    angle = math.radians(angle_degrees)
    turn = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    return points @ turn.T + 0.5


def write_landmark_model(path: Path, template: np.ndarray, follow: float = 0.0,
                         channel_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
                         euler: tuple[float, float, float] = (0.1, -0.2, 0.05), score_gain: float = 0.0,
                         score_bias: float = 0.9) -> Path:
    """landmarks = template + follow * centroid / 128, centroid = the brightness-weighted mean pixel position
    (x = column, y = row) of the crop; brightness = channel_weights . crop."""
    from onnx import TensorProto, helper, numpy_helper

    template = np.asarray(template, np.float32)
    rows, columns = np.mgrid[:CROP, :CROP].astype(np.float32)
    initializers = [
        numpy_helper.from_array(np.asarray(channel_weights, np.float32).reshape(1, 3, 1, 1), "channel_weights"),
        numpy_helper.from_array(columns.reshape(1, 1, CROP, CROP), "column_index"),
        numpy_helper.from_array(rows.reshape(1, 1, CROP, CROP), "row_index"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "epsilon"),
        numpy_helper.from_array(np.array(follow / CROP, np.float32), "follow"),
        numpy_helper.from_array(template[:, 0].reshape(1, POINTS), "template_x"),
        numpy_helper.from_array(template[:, 1].reshape(1, POINTS), "template_y"),
        numpy_helper.from_array(np.asarray(euler, np.float32).reshape(1, 3), "euler_values"),
        numpy_helper.from_array(np.array(score_gain, np.float32), "score_gain"),
        numpy_helper.from_array(np.array(score_bias, np.float32), "score_bias"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "score_shape"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "channel_weights"], ["brightness"]),
        helper.make_node("ReduceSum", ["brightness"], ["mass_raw"], keepdims=0),
        helper.make_node("Add", ["mass_raw", "epsilon"], ["mass"]),
        helper.make_node("Mul", ["brightness", "column_index"], ["weighted_x"]),
        helper.make_node("Mul", ["brightness", "row_index"], ["weighted_y"]),
        helper.make_node("ReduceSum", ["weighted_x"], ["moment_x"], keepdims=0),
        helper.make_node("ReduceSum", ["weighted_y"], ["moment_y"], keepdims=0),
        helper.make_node("Div", ["moment_x", "mass"], ["centroid_x"]),
        helper.make_node("Div", ["moment_y", "mass"], ["centroid_y"]),
        helper.make_node("Mul", ["centroid_x", "follow"], ["shift_x"]),
        helper.make_node("Mul", ["centroid_y", "follow"], ["shift_y"]),
        helper.make_node("Add", ["template_x", "shift_x"], ["landmarks_x"]),
        helper.make_node("Add", ["template_y", "shift_y"], ["landmarks_y"]),
        helper.make_node("Concat", ["landmarks_x", "landmarks_y"], ["landmarks"], axis=1),
        helper.make_node("Mul", ["mass", "zero"], ["nothing"]),
        helper.make_node("Add", ["euler_values", "nothing"], ["euler"]),
        helper.make_node("ReduceMax", ["brightness"], ["brightest"], keepdims=0),
        helper.make_node("Mul", ["brightest", "score_gain"], ["score_scaled"]),
        helper.make_node("Add", ["score_scaled", "score_bias"], ["score_value"]),
        helper.make_node("Reshape", ["score_value", "score_shape"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_face_landmark",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, CROP, CROP])],
        [helper.make_tensor_value_info("landmarks", TensorProto.FLOAT, [1, 2 * POINTS]),
         helper.make_tensor_value_info("euler", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])], initializers)
    return _save(graph, path)


def write_skin_face_files(folder: Path) -> tuple[Path, Path]:
    """face_det.onnx + face_landmark.onnx that find a face on a real video by its colour: the detector fires on
    stride-32 cells redder than green (skin before a green screen, as in lp_d0.mp4), boxes of 96 input pixels; the
    landmark template follows the crop's red centroid and keeps the detector box's size."""
    biases = {8: np.full(grid(8), -20.0), 16: np.full(grid(16), -20.0), 32: np.full(grid(32), -1.0)}
    detector = write_face_detector(folder / "face_det.onnx", channel_weights=(0.0, -1.5, 1.5), biases=biases,
                                   logits={32: distance_logits((1.5,) * 4)})
    landmarks = write_landmark_model(folder / "face_landmark.onnx", face_template() - 0.5, follow=1.0,
                                     channel_weights=(0.0, 0.0, 1.0), score_gain=1.0, score_bias=0.0)
    return detector, landmarks
