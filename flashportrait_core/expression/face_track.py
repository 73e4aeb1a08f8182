"""What a face backend returns, and the interface every backend offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

POINT_NAMES = ("left_pupil", "right_pupil", "nose_tip", "left_mouth_corner", "right_mouth_corner")


@dataclass
class FaceTrack:
    """Per-frame face of one video: 5 points and box in frame pixels; `found` is False where no face was seen.

    points: [B, 5, 2] float32 (x, y), order of POINT_NAMES, "left" meaning the image's left.
    boxes: [B, 4] float32 (x0, y0, x1, y1). Rows of frames without a face are NaN.
    found: [B] bool.
    """

    points: np.ndarray
    boxes: np.ndarray
    found: np.ndarray

    def __post_init__(self) -> None:
        count = self.found.shape[0]
        if self.points.shape != (count, 5, 2) or self.boxes.shape != (count, 4):
            raise ValueError(
                f"inconsistent FaceTrack: points {self.points.shape}, boxes {self.boxes.shape}, found {self.found.shape}"
            )

    @classmethod
    def empty(cls, count: int) -> FaceTrack:
        return cls(
            points=np.full((count, 5, 2), np.nan, dtype=np.float32),
            boxes=np.full((count, 4), np.nan, dtype=np.float32),
            found=np.zeros(count, dtype=bool),
        )

    @classmethod
    def concatenate(cls, tracks: list[FaceTrack]) -> FaceTrack:
        return cls(
            points=np.concatenate([t.points for t in tracks]),
            boxes=np.concatenate([t.boxes for t in tracks]),
            found=np.concatenate([t.found for t in tracks]),
        )


class FaceBackend(Protocol):
    """Finds the main face of each frame. `reset=False` continues the previous call's video (tracking state)."""

    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack: ...
