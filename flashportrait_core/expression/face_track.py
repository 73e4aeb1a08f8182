"""What a face backend returns, the interface every backend offers, and how one face is followed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

POINT_NAMES = ("left_pupil", "right_pupil", "nose_tip", "left_mouth_corner", "right_mouth_corner")

# A face is the one followed when its centre is within this many (previous) face sizes of where that face was
# last seen and its size is within this factor: generous enough for fast head motion, far below the distance
# between two people side by side.
FOLLOW_MAX_DISTANCE = 0.6
FOLLOW_MAX_SIZE_RATIO = 1.8
REACQUIRE_AFTER_FRAMES = 12


@dataclass
class FaceTrack:
    """Per-frame face of one video: 5 points and box in frame pixels; `found` is False where no face was seen.

    points: [B, 5, 2] float32 (x, y), order of POINT_NAMES, "left" meaning the image's left.
    boxes: [B, 4] float32 (x0, y0, x1, y1). Rows of frames without a face are NaN.
    found: [B] bool.
    landmarks: [B, K, 2] float32, the backend's dense landmarks where it has them (MediaPipe's face mesh: 478,
    insightface's 2d106det: 106, FlashPortrait's face_landmark.onnx: 222), else None. Rows of frames without a face are NaN.
    """

    points: np.ndarray
    boxes: np.ndarray
    found: np.ndarray
    landmarks: np.ndarray | None = None

    def __post_init__(self) -> None:
        count = self.found.shape[0]
        if self.points.shape != (count, 5, 2) or self.boxes.shape != (count, 4):
            raise ValueError(
                f"inconsistent FaceTrack: points {self.points.shape}, boxes {self.boxes.shape}, found {self.found.shape}"
            )
        if self.landmarks is not None and (self.landmarks.ndim != 3 or self.landmarks.shape[0] != count
                                           or self.landmarks.shape[2] != 2):
            raise ValueError(f"inconsistent FaceTrack: landmarks {self.landmarks.shape} for {count} frames")

    @classmethod
    def empty(cls, count: int, landmark_count: int = 0) -> FaceTrack:
        """NaN rows for `count` frames; with room for `landmark_count` dense landmarks per frame when > 0."""
        return cls(
            points=np.full((count, 5, 2), np.nan, dtype=np.float32),
            boxes=np.full((count, 4), np.nan, dtype=np.float32),
            found=np.zeros(count, dtype=bool),
            landmarks=np.full((count, landmark_count, 2), np.nan, dtype=np.float32) if landmark_count else None,
        )

    @classmethod
    def concatenate(cls, tracks: list[FaceTrack]) -> FaceTrack:
        # Dense landmarks are kept only when every part has the same kind.
        kinds = {None if t.landmarks is None else t.landmarks.shape[1] for t in tracks}
        landmarks = None
        if len(kinds) == 1 and None not in kinds:
            landmarks = np.concatenate([t.landmarks for t in tracks])
        return cls(
            points=np.concatenate([t.points for t in tracks]),
            boxes=np.concatenate([t.boxes for t in tracks]),
            found=np.concatenate([t.found for t in tracks]),
            landmarks=landmarks,
        )


def box_area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _box_size(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], box[3] - box[1], 1e-6))


def follows(previous: np.ndarray, candidate: np.ndarray) -> float | None:
    """How far `candidate` is from the followed face's `previous` box (in previous face sizes), or None when it
    is too far or too different in size to be the same face."""
    size, candidate_size = _box_size(previous), _box_size(candidate)
    distance = float(np.linalg.norm((candidate[:2] + candidate[2:]) / 2 - (previous[:2] + previous[2:]) / 2)) / size
    ratio = max(candidate_size / size, size / candidate_size)
    if distance > FOLLOW_MAX_DISTANCE or ratio > FOLLOW_MAX_SIZE_RATIO:
        return None
    return distance


def choose_face(boxes: list[np.ndarray], previous: np.ndarray | None) -> int | None:
    """Index of the face to keep: the one following `previous` (nearest), or the largest when nothing is
    followed yet. None when a face is followed and none of the candidates is it."""
    if not boxes:
        return None
    if previous is None:
        return max(range(len(boxes)), key=lambda index: box_area(boxes[index]))
    distances = [(follows(previous, box), index) for index, box in enumerate(boxes)]
    matching = [(distance, index) for distance, index in distances if distance is not None]
    return min(matching)[1] if matching else None


class FaceFollower:
    """Keeps one face through a video for detectors that see each frame alone: the largest face at the start,
    then the face following it (`choose_face`); forgotten after REACQUIRE_AFTER_FRAMES frames out of sight."""

    def __init__(self) -> None:
        self.followed: np.ndarray | None = None
        self.frames_unseen = 0

    def reset(self) -> None:
        self.followed, self.frames_unseen = None, 0

    def choose(self, boxes: list[np.ndarray]) -> int | None:
        """Index of the face to keep among this frame's boxes (None: the followed face is not there)."""
        chosen = choose_face(boxes, self.followed)
        if chosen is not None:
            self.followed, self.frames_unseen = np.asarray(boxes[chosen], dtype=np.float64), 0
        else:
            self.frames_unseen += 1
            if self.frames_unseen >= REACQUIRE_AFTER_FRAMES:
                self.reset()
        return chosen


class FaceBackend(Protocol):
    """Finds the main face of each frame. `reset=False` continues the previous call's video (tracking state).

    A backend whose points come out already filtered over time says so with a `temporal_filter` attribute (a
    name for the user); extraction then adds no smoothing of its own.
    """

    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack: ...
