"""Driving frames -> per-frame 554-d PD-FGC expression features (detect, fill gaps, align, encode)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .alignment import align_face_crops, similarity_to_template
from .face_track import FaceBackend, FaceTrack
from .pdfgc import FanEncoder, expression_features

# Values a little outside [0, 1] (resampling overshoot) are clamped; beyond this the scale is wrong (e.g. 0-255).
RANGE_TOLERANCE = 0.25


@dataclass
class ExpressionFeatures:
    """Per-frame results of one driving video (all on CPU).

    features: [T, 554] float32 = headpose 6 | eye 6 | emo 30 | mouth 512.
    points: [T, 5, 2] float32 frame pixels (after filling). boxes: [T, 4] float32 (x0, y0, x1, y1).
    found: [T] bool, False where the face was not seen. filled_frames: indices whose points were interpolated.
    """

    features: torch.Tensor
    points: torch.Tensor
    boxes: torch.Tensor
    found: torch.Tensor
    filled_frames: list[int]


def check_frames(frames: torch.Tensor) -> None:
    """Validate the IMAGE-layout driving frames (shape and dtype; values are checked per chunk)."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor [T, H, W, C] in [0, 1], got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"frames must have shape [T, H, W, C] with C = 3 (RGB), 1 (grey) or 4 (RGBA), got {list(frames.shape)}"
        )
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames is empty ({list(frames.shape)}): pass at least one driving frame")
    if not frames.is_floating_point():
        raise ValueError(
            f"frames must be floating point in [0, 1], got dtype {frames.dtype}; convert 8-bit frames with "
            "frames.float() / 255"
        )


def rgb_chunk(frames: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Frames [start:stop] as float RGB in [0, 1], checking values: grey is repeated, alpha dropped."""
    chunk = frames[start:stop]
    if chunk.shape[-1] == 1:
        chunk = chunk.expand(-1, -1, -1, 3)
    elif chunk.shape[-1] == 4:
        chunk = chunk[..., :3]
    if not bool(torch.isfinite(chunk).all()):
        raise ValueError(f"frames {start}..{stop - 1} contain NaN or infinite values")
    low, high = float(chunk.min()), float(chunk.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"frames must be in [0, 1], frames {start}..{stop - 1} span [{low:.3g}, {high:.3g}]; "
            "divide 0-255 images by 255"
        )
    return chunk.clamp(0.0, 1.0)


def to_uint8(frames_rgb: torch.Tensor) -> np.ndarray:
    """[B, H, W, 3] float in [0, 1] -> contiguous uint8 RGB array for a face backend."""
    scaled = (frames_rgb.detach().float() * 255.0).round_().clamp_(0, 255)
    return np.ascontiguousarray(scaled.to(torch.uint8).cpu().numpy())


def fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Linearly interpolate rows [T, ...] where `found` is False between the nearest found rows (held at ends)."""
    if not found.any():
        raise ValueError("no row to interpolate from: no frame has a face")
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    known = np.flatnonzero(found)
    times = np.arange(values.shape[0])
    filled = np.stack([np.interp(times, known, flat[known, column]) for column in range(flat.shape[1])], axis=1)
    return filled.reshape(values.shape).astype(values.dtype)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def detect_faces(frames: torch.Tensor, backend: FaceBackend, batch_size: int,
                 on_chunk: Callable[[int], None], should_stop: Callable[[], None] | None) -> FaceTrack:
    """Run the backend over the whole video in chunks, tracking across chunk borders."""
    tracks = []
    for index, (start, stop) in enumerate(_chunks(frames.shape[0], batch_size)):
        if should_stop is not None:
            should_stop()
        tracks.append(backend.detect(to_uint8(rgb_chunk(frames, start, stop)), reset=index == 0))
        on_chunk(stop - start)
    return FaceTrack.concatenate(tracks)


def _encoder_device(encoder: FanEncoder) -> torch.device:
    return next(encoder.parameters()).device


def extract_expression_features(
    frames: torch.Tensor,
    encoder: FanEncoder,
    backend: FaceBackend,
    batch_size: int = 16,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> ExpressionFeatures:
    """Driving frames [T, H, W, C] float in [0, 1] -> ExpressionFeatures.

    Frames without a face get points interpolated from their neighbours (listed in `filled_frames`). Work runs
    in chunks of `batch_size` frames so memory stays bounded. Progress counts each frame twice (detection, then
    encoding): on_progress(done, 2 * T). `should_stop()` is called between chunks; raise from it to interrupt.
    """
    check_frames(frames)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = frames.shape[0]
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if on_progress is not None:
            on_progress(done, 2 * total)

    track = detect_faces(frames, backend, batch_size, advance, should_stop)
    if not track.found.any():
        raise ValueError(
            f"no face found in any of the {total} driving frames; use a video where a face is visible "
            "(frontal or three-quarter view, not too small)"
        )
    found = track.found.copy()
    points = torch.from_numpy(fill_missing(track.points, found))
    boxes = torch.from_numpy(fill_missing(track.boxes, found))
    filled_frames = np.flatnonzero(~found).tolist()

    encoder.eval()
    device = _encoder_device(encoder)
    transforms = similarity_to_template(points.to(torch.float64))
    features = torch.empty(total, 554, dtype=torch.float32)
    for start, stop in _chunks(total, batch_size):
        if should_stop is not None:
            should_stop()
        chunk = rgb_chunk(frames, start, stop).to(device)
        crops = align_face_crops(chunk, transforms[start:stop].to(device))
        features[start:stop] = expression_features(encoder, crops).float().cpu()
        advance(stop - start)

    return ExpressionFeatures(
        features=features,
        points=points,
        boxes=boxes,
        found=torch.from_numpy(found),
        filled_frames=filled_frames,
    )
