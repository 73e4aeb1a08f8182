"""The published temporal smoothing of the 222 face landmarks: one one-euro filter per face region.

Each frame, every region (face outline, nose, eyebrows, each eye, mouth, each pupil) measures how far its points
moved since the previous smoothed frame, in face sizes. A region that barely moved is held almost still, one that
moved a lot follows the new points: the motion sets the filter's sampling period and its speed coefficient (the
published code passes one number as both), between a region's "still" and "moving" thresholds by linear
interpolation. The filter itself is the one-euro filter with a minimum cutoff of 1 and a derivative cutoff of 1.

The filter is causal and runs frame by frame; its output is what the next frame's landmark crop starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LANDMARK_COUNT = 222
MIN_CUTOFF = 1.0
DERIVATIVE_CUTOFF = 1.0


@dataclass(frozen=True)
class Region:
    """Landmarks filtered together: `points` [start, stop); motion is measured over `measured` (default: the same
    points). Below `still` (mean motion in face sizes) the setting grows from 0 to `still_setting`; from `still` to
    `moving` it grows linearly to `moving_setting`, and stays there above."""

    name: str
    points: tuple[int, int]
    still: float
    moving: float
    still_setting: float
    moving_setting: float
    measured: tuple[int, int] | None = None

    def setting(self, motion: float) -> float:
        if motion < self.still:
            return self.still_setting * motion / self.still
        if motion < self.moving:
            fraction = (motion - self.still) / (self.moving - self.still)
            return self.still_setting + (self.moving_setting - self.still_setting) * fraction
        return self.moving_setting


# The published regions of the 222-point layout and their thresholds.
REGIONS = (
    Region("face outline", (0, 33), 0.005, 0.02, 0.05, 0.3, measured=(9, 24)),
    Region("nose", (33, 48), 0.003, 0.02, 0.03, 0.7),
    Region("eyebrows", (48, 74), 0.003, 0.02, 0.02, 0.5),
    Region("left eye", (74, 96), 0.003, 0.02, 0.03, 0.7),
    Region("right eye", (96, 118), 0.003, 0.02, 0.03, 0.7),
    Region("mouth", (118, 182), 0.003, 0.02, 0.05, 0.7),
    Region("left pupil", (182, 202), 0.003, 0.02, 0.03, 0.7),
    Region("right pupil", (202, 222), 0.003, 0.02, 0.03, 0.7),
)


def _smoothing_factor(period: float, cutoff: np.ndarray | float) -> np.ndarray | float:
    rate = 2.0 * math.pi * cutoff * period
    return rate / (rate + 1.0)


class OneEuroRegionFilter:
    """The one-euro filter of one region; the period and speed coefficient are given per call."""

    def __init__(self) -> None:
        self.derivative: np.ndarray | float = 0.0

    def __call__(self, points: np.ndarray, previous: np.ndarray, period: float, beta: float) -> np.ndarray:
        if period == 0.0:
            # A region whose measured points did not move at all: the published arithmetic divides 0 by 0 here
            # and turns the landmarks into NaN for good. Its limit as the period goes to 0 holds the points and
            # adds 2 pi times the step to the speed estimate.
            self.derivative = self.derivative + 2.0 * math.pi * (points - previous)
            return previous.copy()
        alpha_derivative = _smoothing_factor(period, DERIVATIVE_CUTOFF)
        speed = (points - previous) / period
        self.derivative = alpha_derivative * speed + (1.0 - alpha_derivative) * self.derivative
        alpha = _smoothing_factor(period, MIN_CUTOFF + beta * np.abs(self.derivative))
        return alpha * points + (1.0 - alpha) * previous


class LandmarkSmoother:
    """Smooths one face's 222 landmarks frame by frame, as the published tracker does."""

    def __init__(self) -> None:
        self.previous: np.ndarray | None = None
        self._filters = [OneEuroRegionFilter() for _ in REGIONS]

    def __call__(self, landmarks: np.ndarray, face_size: float) -> np.ndarray:
        """Raw landmarks [222, 2] (frame pixels) of this frame -> smoothed landmarks [222, 2] (float64).

        `face_size`: the published face distance (pixels) that motion is divided by. The first frame passes as is.
        """
        landmarks = np.asarray(landmarks, dtype=np.float64)
        if landmarks.shape != (LANDMARK_COUNT, 2):
            raise ValueError(f"landmarks must have shape [{LANDMARK_COUNT}, 2], got {list(landmarks.shape)}")
        if self.previous is None:
            self.previous = landmarks.copy()
            return landmarks.copy()
        motion = np.linalg.norm(landmarks - self.previous, axis=1) / face_size
        smoothed = landmarks.copy()
        for region, region_filter in zip(REGIONS, self._filters):
            start, stop = region.points
            measured_start, measured_stop = region.measured or region.points
            setting = region.setting(float(motion[measured_start:measured_stop].mean()))
            smoothed[start:stop] = region_filter(landmarks[start:stop], self.previous[start:stop], setting, setting)
        self.previous = smoothed
        return smoothed.copy()
