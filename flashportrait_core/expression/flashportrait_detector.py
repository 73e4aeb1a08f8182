"""The face detector shipped with FlashPortrait (`face_det.onnx`, a NanoDet-style model), run with onnxruntime.

Pre- and post-processing as the published pipeline does them:
- The BGR frame is scaled, aspect kept, into the model's 160 x 272 (width x height) input, centred, black around it
  (bilinear), and normalised per channel with NanoDet's BGR mean (103.53, 116.28, 123.675) and std
  (57.375, 57.12, 58.395).
- The model gives, for each of the strides 8, 16 and 32, one face score per cell and, per cell, four distance
  distributions of 8 bins (left, top, right, bottom). A cell's anchor sits at (column, row) x stride; a distance is
  the softmax-weighted mean of the bins 0..7, times the stride.
- Cells scoring above 0.4 are candidates; greedy non-maximum suppression at IoU 0.3 keeps the best of the 200
  highest-scoring candidates.
- Boxes go back to frame pixels through the inverse scaling, are clipped to the frame and truncated to integers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INPUT_HEIGHT, INPUT_WIDTH = 272, 160
STRIDES = (8, 16, 32)
DISTANCE_BINS = 8  # bins 0..7 of each side's distance distribution
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
SCORE_THRESHOLD = 0.4  # kept when above
NMS_THRESHOLD = 0.3  # a box overlapping a better one by more is dropped
NMS_CANDIDATES = 200  # only the highest-scoring candidates enter the suppression
IOU_EPSILON = 1e-5


class FaceFileError(ValueError):
    """A face model file does not have the layout of the published FlashPortrait file."""


def import_cv2() -> Any:
    try:
        import cv2
    except ImportError as error:
        raise ImportError("the flashportrait face backend needs OpenCV for its crops: pip install "
                          "opencv-python-headless") from error
    return cv2


def input_transform(height: int, width: int) -> np.ndarray:
    """[2, 3] map from frame pixels to the detector's input: the frame scaled to fit and centred."""
    if width / height < INPUT_WIDTH / INPUT_HEIGHT:
        scale = INPUT_HEIGHT / height
    else:
        scale = INPUT_WIDTH / width
    return np.array([[scale, 0.0, INPUT_WIDTH / 2 - scale * width / 2],
                     [0.0, scale, INPUT_HEIGHT / 2 - scale * height / 2]], dtype=np.float64)


def detector_input(frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BGR uint8 frame [H, W, 3] -> (model input [1, 3, 272, 160] float32, the [2, 3] frame-to-input map)."""
    cv2 = import_cv2()
    transform = input_transform(*frame_bgr.shape[:2])
    square = np.vstack([transform, [0.0, 0.0, 1.0]])
    scaled = cv2.warpPerspective(frame_bgr, square, (INPUT_WIDTH, INPUT_HEIGHT))
    # The published arithmetic, in float32 and in this order: x / 255, minus mean / 255, over std / 255.
    mean = np.array(MEAN_BGR, dtype=np.float32) / 255
    std = np.array(STD_BGR, dtype=np.float32) / 255
    normalised = (scaled.astype(np.float32) / 255 - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None]), transform


def grid_size(stride: int) -> tuple[int, int]:
    """(rows, columns) of one stride's grid: cells start at 0, stride, ... below the input size."""
    return -(-INPUT_HEIGHT // stride), -(-INPUT_WIDTH // stride)


def anchor_points(stride: int) -> np.ndarray:
    """Anchor positions [rows * columns, 2] (x, y) of one stride, row by row."""
    rows, columns = grid_size(stride)
    ys, xs = np.mgrid[:rows, :columns]
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1).astype(np.float64) * stride


def expected_distances(logits: np.ndarray) -> np.ndarray:
    """Distance logits [N, 4 * 8] -> the four distances [N, 4] in bins (softmax-weighted mean of 0..7)."""
    bins = np.asarray(logits, dtype=np.float64).reshape(-1, 4, DISTANCE_BINS)
    weights = np.exp(bins - bins.max(axis=2, keepdims=True))
    weights /= weights.sum(axis=2, keepdims=True)
    return (weights * np.arange(DISTANCE_BINS)).sum(axis=2)


def decode(outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The model's 6 outputs (scores of strides 8, 16, 32, then their distance logits) -> candidate boxes [N, 4]
    (x0, y0, x1, y1, input pixels) and scores [N] above SCORE_THRESHOLD."""
    if len(outputs) != 2 * len(STRIDES):
        raise FaceFileError(f"face_det.onnx has {len(outputs)} outputs; the published detector has "
                            f"{2 * len(STRIDES)} (a score map and a distance map per stride 8, 16, 32)")
    boxes, scores = [], []
    for level, stride in enumerate(STRIDES):
        anchors = anchor_points(stride)
        level_scores = np.asarray(outputs[level], dtype=np.float32).reshape(-1)
        logits = np.asarray(outputs[level + len(STRIDES)], dtype=np.float32)
        if level_scores.shape[0] != anchors.shape[0] or logits.size != anchors.shape[0] * 4 * DISTANCE_BINS:
            raise FaceFileError(
                f"face_det.onnx stride {stride}: {level_scores.shape[0]} scores and {logits.size} distance values "
                f"for {anchors.shape[0]} cells; the published detector has one score and {4 * DISTANCE_BINS} "
                f"values per cell of a {INPUT_WIDTH}x{INPUT_HEIGHT} input")
        keep = level_scores > SCORE_THRESHOLD
        distances = expected_distances(logits.reshape(anchors.shape[0], -1)[keep]) * stride
        kept = anchors[keep]
        boxes.append(np.concatenate([kept - distances[:, :2], kept + distances[:, 2:]], axis=1))
        scores.append(level_scores[keep])
    return np.concatenate(boxes), np.concatenate(scores)


def suppress(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression among the NMS_CANDIDATES best, best first."""
    order = np.argsort(-scores, kind="stable")[:NMS_CANDIDATES]
    sides = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)
    areas = sides[:, 0] * sides[:, 1]
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        overlap = np.clip(np.minimum(boxes[rest, 2:], boxes[best, 2:]) - np.maximum(boxes[rest, :2], boxes[best, :2]),
                          0.0, None).prod(axis=1)
        iou = overlap / (areas[rest] + areas[best] - overlap + IOU_EPSILON)
        order = rest[iou <= NMS_THRESHOLD]
    return np.array(kept, dtype=np.int64)


def to_frame(boxes: np.ndarray, transform: np.ndarray, height: int, width: int) -> np.ndarray:
    """Input-pixel boxes [N, 4] -> frame pixels through the inverse of `transform`, clipped, truncated to int."""
    scale, offset = transform[[0, 1], [0, 1]], transform[:, 2]
    framed = (boxes.reshape(-1, 2, 2) - offset) / scale
    framed[..., 0] = framed[..., 0].clip(0, width)
    framed[..., 1] = framed[..., 1].clip(0, height)
    return framed.reshape(-1, 4).astype(np.float32).astype(np.int32)


class FaceDetector:
    """`face_det.onnx` in an onnxruntime session."""

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str], runtime: Any) -> None:
        self.path = Path(path)
        self._session = runtime.InferenceSession(str(self.path), providers=list(providers))
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        static = [d for d in model_input.shape[1:] if isinstance(d, int)]
        if len(model_input.shape) != 4 or (len(static) == 3 and static != [3, INPUT_HEIGHT, INPUT_WIDTH]):
            raise FaceFileError(f"{self.path.name} takes input {model_input.shape}; the published face detector "
                                f"takes [1, 3, {INPUT_HEIGHT}, {INPUT_WIDTH}]")
        if len(self._session.get_outputs()) != 2 * len(STRIDES):
            raise FaceFileError(f"{self.path.name} has {len(self._session.get_outputs())} outputs; the published "
                                f"face detector has {2 * len(STRIDES)}")

    def faces(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All faces of a BGR uint8 frame: integer boxes [N, 4] (x0, y0, x1, y1, frame pixels), scores [N], best
        first."""
        blob, transform = detector_input(frame_bgr)
        boxes, scores = decode(self._session.run(None, {self._input_name: blob}))
        keep = suppress(boxes, scores)
        return to_frame(boxes[keep], transform, *frame_bgr.shape[:2]), scores[keep]
