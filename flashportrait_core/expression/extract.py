"""Driving frames -> per-frame 554-d PD-FGC expression features (detect, fill gaps, smooth, align, encode).

Two passes over the video, each in chunks: the first finds the face points of every frame (a few numbers per
frame are kept); gaps are filled and the points smoothed over the whole sequence; the second pass aligns and
encodes. Frames are never all held at once, so a video read from a file streams with flat memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .alignment import align_face_crops, cut_warp_regions, similarity_to_template
from .face_track import FaceBackend, FaceTrack
from .pdfgc import FEATURE_DIM, FanEncoder, expression_features
from .smoothing import face_sizes, settings_for_strength, smooth_sequence
from .video import DEFAULT_FPS, iter_video_chunks, probe_video

# Values a little outside [0, 1] (resampling overshoot) are clamped; beyond this the scale is wrong (e.g. 0-255).
RANGE_TOLERANCE = 0.25

ProgressCallback = Callable[[int, int], None]
StopCallback = Callable[[], None]
Chunk = torch.Tensor | np.ndarray  # [B, H, W, C]: float in [0, 1], or uint8 (decoded video)


@dataclass
class ExpressionFeatures:
    """Per-frame results of one driving video (all on CPU).

    features: [T, 554] float32 = headpose 6 | eye 6 | emo 30 | mouth 512.
    points: [T, 5, 2] float32 frame pixels (after filling and smoothing). boxes: [T, 4] float32 (x0, y0, x1, y1).
    found: [T] bool, False where the face was not seen. filled_frames: indices whose points were interpolated.
    fps: frame rate of these T frames. source_fps / source_frames: the driving video's, before any frame-rate
    conversion. frame_size: (height, width) of the driving frames, in which points and boxes are measured.
    landmarks: [T, K, 2] float32 frame pixels, the backend's dense landmarks as it gives them (MediaPipe: 478,
    flashportrait: 222, already smoothed by the published filter; not filled or smoothed here, NaN where no face
    was seen), or None when the backend has none (insightface SCRFD without 2d106det).
    point_filter: the temporal filter the face backend applied itself (flashportrait: the published landmark
    filter), when it has one; `smoothing` is then 0, as no filter of ours is added.
    source: the driving video's file name ("" for frames); face_backend: the backend that found the faces, as the
    report names it; edits: one line per edit applied since extraction (expression/edit.py), kept when saved.
    """

    features: torch.Tensor
    points: torch.Tensor
    boxes: torch.Tensor
    found: torch.Tensor
    filled_frames: list[int]
    fps: float = DEFAULT_FPS
    source_fps: float = DEFAULT_FPS
    source_frames: int = 0
    smoothing: float = 0.0
    frame_size: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)
    landmarks: torch.Tensor | None = None
    point_filter: str = ""
    source: str = ""
    face_backend: str = ""
    edits: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.source_frames:
            self.source_frames = int(self.features.shape[0])

    def report(self) -> str:
        """A short text for a user: frames, faces found, frames filled, frame rates, smoothing."""
        total = self.features.shape[0]
        filled = self.filled_frames
        parts = [f"{total} frames, face found in {int(self.found.sum())}, {len(filled)} filled by interpolation"
                 + (f": {filled[:20]}" + (" ..." if len(filled) > 20 else "") if filled else "")]
        if total != self.source_frames or self.fps != self.source_fps:
            parts.append(f"{self.fps:g} fps, resampled from {self.source_frames} frames at {self.source_fps:g} fps")
        else:
            parts.append(f"{self.fps:g} fps")
        if self.point_filter:
            parts.append(f"points smoothed by {self.point_filter} (the smoothing setting is for the other face "
                         "backends)")
        else:
            parts.append(f"smoothing {self.smoothing:g}")
        return "; ".join(parts + self.notes)


# -- input checks -----------------------------------------------------------------------------------------------

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


def _three_channels(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.shape[-1] == 1:
        return chunk.expand(-1, -1, -1, 3)  # grey: the same value in R, G and B
    if chunk.shape[-1] == 4:
        return chunk[..., :3]  # RGBA: alpha is not part of the picture the face is found in
    return chunk


def rgb_chunk(frames: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Frames [start:stop] as float RGB in [0, 1], checking values: grey is repeated, alpha dropped."""
    chunk = _three_channels(frames[start:stop])
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


def _as_tensor(chunk: Chunk) -> torch.Tensor:
    return torch.from_numpy(chunk) if isinstance(chunk, np.ndarray) else chunk


def _detector_input(chunk: torch.Tensor) -> np.ndarray:
    if chunk.dtype == torch.uint8:
        return np.ascontiguousarray(chunk.numpy())
    return to_uint8(chunk)


# -- stages -----------------------------------------------------------------------------------------------------

def fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Linearly interpolate rows [T, ...] where `found` is False between the nearest found rows (held at ends)."""
    if not found.any():
        raise ValueError("no row to interpolate from: no frame has a face")
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    known = np.flatnonzero(found)
    times = np.arange(values.shape[0])
    filled = np.stack([np.interp(times, known, flat[known, column]) for column in range(flat.shape[1])], axis=1)
    return filled.reshape(values.shape).astype(values.dtype)


def track_faces(chunks: Iterable[torch.Tensor], backend: FaceBackend,
                on_frames: Callable[[int], None] = lambda count: None,
                should_stop: StopCallback | None = None) -> FaceTrack:
    """First pass: the backend over every chunk in order, tracking across chunk borders."""
    tracks = []
    for index, chunk in enumerate(chunks):
        if should_stop is not None:
            should_stop()
        tracks.append(backend.detect(_detector_input(chunk), reset=index == 0))
        on_frames(chunk.shape[0])
    if not tracks:
        raise ValueError("the driving video has no frames")
    return FaceTrack.concatenate(tracks)


@dataclass
class StableTrack:
    """Points and boxes of every frame after gap filling and smoothing."""

    points: np.ndarray  # [T, 5, 2] float32
    boxes: np.ndarray  # [T, 4] float32
    found: np.ndarray  # [T] bool
    filled_frames: list[int]
    landmarks: np.ndarray | None = None  # [T, K, 2] as detected (NaN where not found), when the backend has them


def stabilize_track(track: FaceTrack, fps: float, smoothing: float) -> StableTrack:
    """Fill frames without a face from their neighbours, then smooth the points over time (0 = off)."""
    total = track.found.shape[0]
    if not track.found.any():
        raise ValueError(
            f"no face found in any of the {total} driving frames; use a video where a face is visible "
            "(frontal or three-quarter view, not too small)"
        )
    settings_for_strength(smoothing)  # validates the strength before any work
    points = fill_missing(track.points, track.found)
    boxes = fill_missing(track.boxes, track.found)
    sizes = face_sizes(boxes)
    return StableTrack(
        points=smooth_sequence(points, sizes, fps, smoothing),
        boxes=smooth_sequence(boxes, sizes, fps, smoothing),
        found=track.found.copy(),
        filled_frames=np.flatnonzero(~track.found).tolist(),
        landmarks=track.landmarks,
    )


def encoder_device(encoder: FanEncoder) -> torch.device:
    return next(encoder.parameters()).device


def align_chunk(chunk: torch.Tensor, transforms: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One chunk [B, H, W, 3] (float in [0, 1] or uint8) -> aligned crops [B, 3, 224, 224] in [-1, 1] on device.

    Only the part of each frame the warp reads is cut out and moved, so large frames cost what small ones do.
    The warp itself is the published one (bicubic, no pre-filter), also for faces much larger than the crop.
    """
    regions, shifted = cut_warp_regions(chunk, transforms)
    regions = regions.to(device)
    regions = regions.float().div_(255.0) if regions.dtype == torch.uint8 else regions
    return align_face_crops(regions, shifted.to(device))


def encode_chunks(chunks: Iterable[torch.Tensor], transforms: torch.Tensor, encoder: FanEncoder,
                  on_frames: Callable[[int], None] = lambda count: None,
                  should_stop: StopCallback | None = None) -> torch.Tensor:
    """Second pass: align every chunk with its frames' transforms [T, 2, 3] and encode -> features [T, 554]."""
    total = transforms.shape[0]
    features = torch.empty(total, FEATURE_DIM, dtype=torch.float32)
    device = encoder_device(encoder)
    start = 0
    for chunk in chunks:
        if should_stop is not None:
            should_stop()
        stop = start + chunk.shape[0]
        if stop > total:
            raise ValueError(f"the driving video yielded more frames on the second pass ({stop}) than the first "
                             f"({total}); the file changed while it was read")
        crops = align_chunk(chunk, transforms[start:stop], device)
        features[start:stop] = expression_features(encoder, crops).float().cpu()
        on_frames(stop - start)
        start = stop
    if start != total:
        raise ValueError(f"the driving video yielded {start} frames on the second pass but {total} on the first; "
                         "the file changed while it was read")
    return features


class _Progress:
    """Counts frames over both passes: on_progress(done, 2 * expected)."""

    def __init__(self, expected: int, on_progress: ProgressCallback | None) -> None:
        self.total, self.done, self.on_progress = 2 * max(expected, 1), 0, on_progress

    def __call__(self, count: int) -> None:
        self.done += count
        self.total = max(self.total, self.done)
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)

    def finish_first_pass(self, frames: int) -> None:
        """The real frame count is known after the first pass (containers may state it wrong)."""
        self.total = 2 * frames
        self.done = frames


def backend_point_filter(backend: FaceBackend) -> str:
    """The temporal filter a backend applies to its own points (its `temporal_filter`), or "" when it has none."""
    return getattr(backend, "temporal_filter", None) or ""


def _run(passes: Callable[[], Iterator[torch.Tensor]], expected_frames: int, encoder: FanEncoder,
         backend: FaceBackend, fps: float, smoothing: float, on_progress: ProgressCallback | None,
         should_stop: StopCallback | None) -> tuple[StableTrack, torch.Tensor, str]:
    """Both passes; returns the track, the features and the backend's own point filter ("" when it has none).
    Our smoothing is left out where the backend filters its points: the published pipeline filters them once."""
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive frame rate, got {fps}")
    settings_for_strength(smoothing)
    point_filter = backend_point_filter(backend)
    progress = _Progress(expected_frames, on_progress)
    track = track_faces(passes(), backend, progress, should_stop)
    progress.finish_first_pass(track.found.shape[0])
    stable = stabilize_track(track, fps, 0.0 if point_filter else smoothing)
    transforms = similarity_to_template(torch.from_numpy(stable.points).to(torch.float64))
    features = encode_chunks(passes(), transforms, encoder, progress, should_stop)
    return stable, features, point_filter


def _result(stable: StableTrack, features: torch.Tensor, fps: float, smoothing: float,
            frame_size: tuple[int, int], point_filter: str) -> ExpressionFeatures:
    return ExpressionFeatures(
        features=features,
        points=torch.from_numpy(stable.points),
        boxes=torch.from_numpy(stable.boxes),
        found=torch.from_numpy(stable.found),
        filled_frames=stable.filled_frames,
        fps=fps,
        source_fps=fps,
        source_frames=int(features.shape[0]),
        smoothing=0.0 if point_filter else smoothing,
        frame_size=frame_size,
        landmarks=None if stable.landmarks is None else torch.from_numpy(stable.landmarks),
        point_filter=point_filter,
    )


# -- entry points -----------------------------------------------------------------------------------------------

def extract_expression_features(
    frames: torch.Tensor,
    encoder: FanEncoder,
    backend: FaceBackend,
    batch_size: int = 16,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    smoothing: float = 0.0,
    fps: float = DEFAULT_FPS,
) -> ExpressionFeatures:
    """Driving frames [T, H, W, C] float in [0, 1] (IMAGE layout; grey and RGBA accepted) -> ExpressionFeatures.

    Frames without a face get points interpolated from their neighbours (listed in `filled_frames`); `smoothing`
    in [0, 1] filters the points over time (0 = off), at the frames' rate `fps`, unless the backend filters its
    points itself (`temporal_filter`, as the flashportrait backend does). Work runs in chunks of
    `batch_size` frames. Progress counts each frame twice (detection, then encoding): on_progress(done, 2 * T).
    `should_stop()` is called between chunks; raise from it to interrupt.
    """
    check_frames(frames)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = frames.shape[0]

    def passes() -> Iterator[torch.Tensor]:
        for start in range(0, total, batch_size):
            yield rgb_chunk(frames, start, min(start + batch_size, total))

    stable, features, point_filter = _run(passes, total, encoder, backend, fps, smoothing, on_progress, should_stop)
    return _result(stable, features, fps, smoothing, (frames.shape[1], frames.shape[2]), point_filter)


def extract_expression_features_from_video(
    path: str | os.PathLike[str],
    encoder: FanEncoder,
    backend: FaceBackend,
    batch_size: int = 16,
    smoothing: float = 0.0,
    max_frames: int | None = None,
    target_fps: float | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> ExpressionFeatures:
    """A driving video file -> ExpressionFeatures, decoding twice in chunks of `batch_size` (flat memory).

    fps and the frame count come from the container. `max_frames` keeps the first N frames of the file.
    `target_fps` (None or 0 = keep the video's rate) resamples the feature sequence to that rate (see
    `resample.resample_expressions`): the sequence then has one entry per output video frame at that rate.
    """
    from .resample import resample_expressions

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be a positive number of frames or None (all), got {max_frames}")
    if target_fps is not None and target_fps != 0 and (not math.isfinite(target_fps) or target_fps < 0):
        raise ValueError(f"target_fps must be a positive frame rate, or 0/None to keep the video's, got {target_fps}")
    info = probe_video(path)
    expected = info.frame_count if max_frames is None else min(max_frames, info.frame_count or max_frames)

    def passes() -> Iterator[torch.Tensor]:
        for chunk in iter_video_chunks(info.path, batch_size, max_frames):
            yield torch.from_numpy(chunk)

    stable, features, point_filter = _run(passes, expected, encoder, backend, info.fps, smoothing, on_progress,
                                          should_stop)
    result = _result(stable, features, info.fps, smoothing, (info.height, info.width), point_filter)
    if info.frame_count_exact and max_frames is None and info.frame_count != result.source_frames:
        result.notes.append(f"the container states {info.frame_count} frames, {result.source_frames} decoded")
    result.source = os.path.basename(info.path)
    if target_fps:
        result = resample_expressions(result, float(target_fps))
    return result
