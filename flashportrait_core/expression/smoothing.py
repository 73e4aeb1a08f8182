"""Temporal smoothing of face points: a one-euro filter, run forward and backward over the whole sequence.

The one-euro filter (Casiez et al., CHI 2012) is a first-order low-pass whose cutoff rises with the speed of the
signal: still faces are smoothed hard (detector jitter removed), fast head turns and mouth openings pass with little
lag. Positions are measured in face sizes, so one setting behaves the same on a small and a large face.

Extraction sees the whole point sequence before any crop is encoded, so the filter runs forward and then backward
over the forward result: the backward pass cancels the forward pass's lag, which would otherwise shift every
expression later in time than the driving video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Cutoff of the speed estimate (Hz). Above the filter's usual 1 Hz so that the cutoff opens within a few frames
# when a head turn starts (measured on the driving videos: about half the lag of 1 Hz for the same jitter).
DERIVATIVE_CUTOFF_HZ = 2.0
# Strength 0 -> 1 moves both settings geometrically between these ends: the cutoff of a still face (Hz) and
# the cutoff added per face size per second of motion (Hz). Weak keeps fast motion almost untouched; strong
# follows a head turn more slowly.
WEAKEST = (4.0, 100.0)
STRONGEST = (0.3, 3.0)
# Length of the reflected padding at each end (seconds): about the slowest filter's settling time.
END_PADDING_S = 1.0


@dataclass(frozen=True)
class OneEuroSettings:
    """min_cutoff_hz: cutoff for a still face. beta: Hz of cutoff added per face size/s of speed."""

    min_cutoff_hz: float
    beta: float
    derivative_cutoff_hz: float = DERIVATIVE_CUTOFF_HZ


def settings_for_strength(strength: float) -> OneEuroSettings | None:
    """User-facing strength in [0, 1] -> filter settings; 0 turns smoothing off (None)."""
    if not math.isfinite(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"smoothing strength must be between 0 (off) and 1 (strongest), got {strength}")
    if strength == 0.0:
        return None
    min_cutoff, beta = (weak * (strong / weak) ** strength for weak, strong in zip(WEAKEST, STRONGEST))
    return OneEuroSettings(min_cutoff_hz=min_cutoff, beta=beta)


def _alpha(cutoff_hz: np.ndarray | float, period_s: float) -> np.ndarray | float:
    """Exponential smoothing factor of a first-order low-pass with this cutoff, sampled every period_s."""
    time_constant = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + time_constant / period_s)


def one_euro_pass(values: np.ndarray, scale: np.ndarray, fps: float, settings: OneEuroSettings) -> np.ndarray:
    """One causal one-euro pass over rows of `values` [T, C]; `scale` [T] is the face size per frame (pixels).

    Speed is measured in face sizes per second, per column. Returns a new float64 array.
    """
    period = 1.0 / fps
    alpha_derivative = _alpha(settings.derivative_cutoff_hz, period)
    filtered = np.empty_like(values, dtype=np.float64)
    filtered[0] = values[0]
    derivative = np.zeros(values.shape[1], dtype=np.float64)
    for index in range(1, values.shape[0]):
        raw_derivative = (values[index] - filtered[index - 1]) * fps / scale[index]
        derivative = derivative + alpha_derivative * (raw_derivative - derivative)
        cutoff = settings.min_cutoff_hz + settings.beta * np.abs(derivative)
        alpha = _alpha(cutoff, period)
        filtered[index] = filtered[index - 1] + alpha * (values[index] - filtered[index - 1])
    return filtered


def smooth_sequence(values: np.ndarray, scale: np.ndarray, fps: float, strength: float) -> np.ndarray:
    """Zero-lag one-euro smoothing of a per-frame sequence [T, ...] (forward pass, then backward over it).

    `scale` [T]: face size per frame in the units of `values` (positive). Strength 0 returns the values unchanged.
    Same dtype and shape as `values`.
    """
    settings = settings_for_strength(strength)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive frame rate, got {fps}")
    values = np.asarray(values)
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (values.shape[0],):
        raise ValueError(f"scale must have one face size per frame, shape [{values.shape[0]}], got {scale.shape}")
    if settings is None or values.shape[0] < 2:
        return values.copy()
    if not np.isfinite(values).all() or not (np.isfinite(scale) & (scale > 0)).all():
        raise ValueError("smoothing needs finite values and positive face sizes in every frame; fill gaps first")
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    # Odd reflection at both ends (as filtfilt pads): the filter's start-up happens in the padding, and a motion
    # under way at either end continues through it, so the first and last frames are not pulled toward the past.
    pad = min(values.shape[0] - 1, int(round(fps * END_PADDING_S)))
    padded = np.concatenate([2 * flat[:1] - flat[pad:0:-1], flat, 2 * flat[-1:] - flat[-2:-pad - 2:-1]])
    padded_scale = np.concatenate([scale[pad:0:-1], scale, scale[-2:-pad - 2:-1]])
    forward = one_euro_pass(padded, padded_scale, fps, settings)
    backward = one_euro_pass(forward[::-1], padded_scale[::-1], fps, settings)[::-1]
    return backward[pad:pad + values.shape[0]].reshape(values.shape).astype(values.dtype)


def face_sizes(boxes: np.ndarray) -> np.ndarray:
    """Face size per frame (pixels): the larger side of each box [T, 4], at least 1."""
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return np.maximum(sides.astype(np.float64), 1.0)


def point_jitter(points: np.ndarray, boxes: np.ndarray) -> float:
    """Mean frame-to-frame motion of the face points [T, 5, 2], in face sizes (boxes [T, 4])."""
    if points.shape[0] < 2:
        return 0.0
    motion = np.linalg.norm(np.diff(points.astype(np.float64), axis=0), axis=-1).mean(axis=-1)
    return float((motion / face_sizes(boxes)[1:]).mean())
