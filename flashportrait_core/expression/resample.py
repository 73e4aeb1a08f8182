"""Frame-rate conversion of an expression sequence (e.g. a 30 fps driving video -> the model's 25 fps).

Output frame k sits at time k / target_fps. Its features, points and boxes are the linear interpolation of
the two source frames around that time (source frame i sits at i / source_fps), so motion keeps its speed and
no frame is dropped or doubled abruptly. The output covers the source's duration: it ends at the last output
time that does not pass the last source frame. A frame counts as found when every source frame it is
interpolated from had a detected face.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .extract import ExpressionFeatures

# Rates closer than this are the same rate (container rates like 30000/1001 are kept as they are).
SAME_RATE_TOLERANCE = 1e-6


def resample_positions(source_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source frame positions (fractional indices) of each output frame."""
    if source_frames < 1:
        raise ValueError(f"source_frames must be >= 1, got {source_frames}")
    for name, rate in (("source_fps", source_fps), ("target_fps", target_fps)):
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"{name} must be a positive frame rate, got {rate}")
    step = source_fps / target_fps
    # The small tolerance keeps an output frame that lands exactly on the last source frame.
    count = int(math.floor((source_frames - 1) / step + 1e-9)) + 1
    return np.minimum(np.arange(count, dtype=np.float64) * step, source_frames - 1)


def _interpolate(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 weight: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (values.ndim - 1)
    work = values.to(torch.float64)
    mixed = work[lower] * (1 - weight).reshape(shape) + work[upper] * weight.reshape(shape)
    return mixed.to(values.dtype)


def _interpolate_gaps(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """Like `_interpolate` for values with NaN rows (frames without a face): a neighbour of weight 0 is not
    read, so an output frame on a found source frame keeps its values even beside a missing one."""
    shape = (-1,) + (1,) * (values.ndim - 1)
    mixed = _interpolate(values, lower, upper, weight)
    mixed = torch.where((weight <= 0).reshape(shape), values[lower], mixed)
    return torch.where((weight >= 1).reshape(shape), values[upper], mixed)


def resample_expressions(expressions: ExpressionFeatures, target_fps: float) -> ExpressionFeatures:
    """The sequence at `target_fps` (linear interpolation in time); unchanged when the rates are equal."""
    source_fps = expressions.fps
    if abs(target_fps - source_fps) <= SAME_RATE_TOLERANCE * max(source_fps, 1.0):
        return expressions
    positions = resample_positions(expressions.features.shape[0], source_fps, target_fps)
    lower_np = np.floor(positions).astype(np.int64)
    upper_np = np.minimum(lower_np + 1, expressions.features.shape[0] - 1)
    weight_np = positions - lower_np
    lower, upper = torch.from_numpy(lower_np), torch.from_numpy(upper_np)
    weight = torch.from_numpy(weight_np)
    found_source = expressions.found
    # A neighbour with weight 0 does not contribute, so its detection does not matter.
    found = (found_source[lower] | torch.from_numpy(weight_np >= 1.0)) & (
        found_source[upper] | torch.from_numpy(weight_np <= 0.0))
    return dataclasses.replace(
        expressions,
        features=_interpolate(expressions.features, lower, upper, weight),
        points=_interpolate(expressions.points, lower, upper, weight),
        boxes=_interpolate(expressions.boxes, lower, upper, weight),
        landmarks=None if expressions.landmarks is None else _interpolate_gaps(expressions.landmarks, lower, upper,
                                                                               weight),
        found=found,
        filled_frames=torch.nonzero(~found).flatten().tolist(),
        fps=float(target_fps),
        notes=list(expressions.notes),
    )
