"""The 222-point landmark model shipped with FlashPortrait (`face_landmark.onnx`), iterated on its own crops.

As the published pipeline does it:
- The model sees a 128 x 128 BGR crop scaled to [0, 1] (NCHW) and answers the 222 landmarks (all x, then all y,
  as fractions of the crop), two Euler angles (pitch, yaw, radians) and a face score.
- The first crop comes from a face box: its centre to the crop centre, its longer side to 128 x (1 - 0.15) pixels.
  Later crops come from landmarks: turned by an angle about the centre of the landmarks' box so that the box, in
  the turned frame, has its longer side at 128 x (1 - 0.15) pixels and its centre at the crop centre.
- The crop is taken 3 times: from the box (or the previous frame's landmarks), then twice from the landmarks just
  found, each time turned by the eye-corner angle (points 74 -> 96) measured in the previous crop. (The published
  code passes that crop's own angle, not the frame's; from a box the turns therefore alternate.)
- The roll is the eye-corner angle in the last crop; the landmarks go back to frame pixels through the inverse of
  the crop's map.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .flashportrait_detector import FaceFileError, import_cv2
from .landmark_smoothing import LANDMARK_COUNT

CROP_SIZE = 128
EXPAND_RATIO = 0.15  # the face fills 1 - 0.15 of the crop side
ITERATIONS = 3
EYE_CORNERS = (74, 96)  # image-left eye's outer corner, image-right eye's outer corner
EYE_ANGLE_EPSILON = 1e-8  # added to the horizontal eye distance, as published


def turn_and_scale(centre: np.ndarray, angle_degrees: float, scale: float) -> np.ndarray:
    """[2, 3] map turning by `angle_degrees` (counter-clockwise on screen) and scaling about `centre`."""
    angle = math.radians(angle_degrees)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    x, y = float(centre[0]), float(centre[1])
    return np.array([[cos, sin, (1 - cos) * x - sin * y],
                     [-sin, cos, sin * x + (1 - cos) * y]], dtype=np.float64)


def apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [K, 2] through an affine map [2, 3]."""
    return np.asarray(points, dtype=np.float64) @ transform[:, :2].T + transform[:, 2]


def invert(transform: np.ndarray) -> np.ndarray:
    """The inverse [2, 3] of an affine map (written out: a LAPACK call costs more than the whole crop here)."""
    (a, b), (c, d) = transform[:, :2]
    determinant = a * d - b * c
    linear = np.array([[d, -b], [-c, a]]) / determinant
    return np.concatenate([linear, -linear @ transform[:, 2:]], axis=1)


def _box_centre(points: np.ndarray) -> np.ndarray:
    return (points.min(axis=0) + points.max(axis=0)) / 2


def crop_from_box(box: Sequence[float]) -> np.ndarray:
    """[2, 3] map from frame pixels to the crop around a face box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    scale = CROP_SIZE / max(x1 - x0, y1 - y0) * (1 - EXPAND_RATIO)
    transform = turn_and_scale(centre, 0.0, scale)
    transform[:, 2] += CROP_SIZE / 2 - centre
    return transform


def crop_from_landmarks(landmarks: np.ndarray, angle_degrees: float) -> np.ndarray:
    """[2, 3] map from frame pixels to the crop around landmarks [K, 2], turned by `angle_degrees`."""
    centre = _box_centre(landmarks)
    turned = apply(turn_and_scale(centre, angle_degrees, 1.0), landmarks)
    scale = CROP_SIZE / (turned.max(axis=0) - turned.min(axis=0)).max() * (1 - EXPAND_RATIO)
    transform = turn_and_scale(centre, angle_degrees, scale)
    transform[:, 2] += CROP_SIZE / 2 - _box_centre(apply(transform, landmarks))
    return transform


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle (radians) of the line from landmark 74 to landmark 96."""
    left, right = landmarks[EYE_CORNERS[0]], landmarks[EYE_CORNERS[1]]
    return math.atan2(right[1] - left[1], right[0] - left[0] + EYE_ANGLE_EPSILON)


@dataclass
class Alignment:
    """One face's answer: landmarks [222, 2] in frame pixels, pitch and yaw (radians), the roll (radians) in the
    last crop, the face score, and the last crop's map [2, 3]."""

    landmarks: np.ndarray
    pitch: float
    yaw: float
    roll: float
    score: float
    crop: np.ndarray


class LandmarkModel:
    """`face_landmark.onnx` in an onnxruntime session."""

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str], runtime: Any) -> None:
        self.path = Path(path)
        self._session = runtime.InferenceSession(str(self.path), providers=list(providers))
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        static = [d for d in model_input.shape[1:] if isinstance(d, int)]
        if len(model_input.shape) != 4 or (len(static) == 3 and static != [3, CROP_SIZE, CROP_SIZE]):
            raise FaceFileError(f"{self.path.name} takes input {model_input.shape}; the published landmark model "
                                f"takes [1, 3, {CROP_SIZE}, {CROP_SIZE}]")
        outputs = self._session.get_outputs()
        self._output_names = [output.name for output in outputs]
        if len(outputs) != 3:
            raise FaceFileError(f"{self.path.name} has {len(outputs)} outputs; the published landmark model has 3 "
                                "(landmarks, Euler angles, face score)")
        values = [d for d in outputs[0].shape[1:] if isinstance(d, int)]
        if len(values) == len(outputs[0].shape) - 1 and int(np.prod(values)) != 2 * LANDMARK_COUNT:
            raise FaceFileError(f"{self.path.name} answers {outputs[0].shape} landmark values; the published model "
                                f"answers {2 * LANDMARK_COUNT} (222 points, all x then all y)")

    def predict(self, crop_bgr: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """A 128 x 128 BGR uint8 crop -> landmarks [222, 2] in crop pixels, pitch, yaw, face score."""
        blob = crop_bgr.transpose(2, 0, 1).astype(np.float32)[None] / 255.0
        values, euler, score = self._session.run(self._output_names[:3], {self._input_name: blob})
        values = np.asarray(values)[0].reshape(-1)
        if values.size != 2 * LANDMARK_COUNT:
            raise FaceFileError(f"{self.path.name} answers {values.size} landmark values; the published model "
                                f"answers {2 * LANDMARK_COUNT} (222 points, all x then all y)")
        landmarks = values.reshape(2, LANDMARK_COUNT).T.astype(np.float64) * CROP_SIZE
        euler = np.asarray(euler, dtype=np.float64).reshape(-1)
        return landmarks, float(euler[0]), float(euler[1]), float(np.asarray(score).reshape(-1)[0])

    def align(self, frame_bgr: np.ndarray, box: Sequence[float] | None = None,
              previous: np.ndarray | None = None, iterations: int = ITERATIONS) -> Alignment:
        """The face's landmarks from a box, or from the previous frame's landmarks [222, 2] (frame pixels)."""
        cv2 = import_cv2()
        if previous is not None:
            crop = crop_from_landmarks(previous, math.degrees(eye_angle(previous)))
        elif box is not None:
            crop = crop_from_box(box)
        else:
            raise ValueError("align needs a face box or the previous frame's landmarks")
        for iteration in range(iterations):
            if iteration:
                crop = crop_from_landmarks(landmarks, math.degrees(roll))
            pixels = cv2.warpAffine(frame_bgr, crop, (CROP_SIZE, CROP_SIZE))
            crop_landmarks, pitch, yaw, score = self.predict(pixels)
            roll = eye_angle(crop_landmarks)
            landmarks = apply(invert(crop), crop_landmarks)
        return Alignment(landmarks=landmarks, pitch=pitch, yaw=yaw, roll=roll, score=score, crop=crop)
