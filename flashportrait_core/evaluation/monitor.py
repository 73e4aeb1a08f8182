"""The drift monitor: an output video against its reference portrait and its driving performance, streamed.

Two passes over the output in chunks, as extraction makes them: the first finds the face in every frame (with the
expression model's face backend) and measures the frame-to-frame change; the face points are then filled and
smoothed exactly as extraction does (the driving performance's smoothing, the output's frame rate); the second
pass aligns each frame for PD-FGC (expression fidelity) and for ArcFace (identity). Only per-frame numbers are
kept, so memory does not grow with the video's length beyond a few kilobytes per frame.

Output frame j shows driving frame j + `driving_offset` (1 when the sampler's reference frame was left out of the
video, as Decode to Video File does by default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..expression.alignment import similarity_to_template
# Extraction's progress: each frame counted twice (detection, then encoding).
from ..expression.extract import _Progress as TwoPassProgress
from ..expression.extract import (ExpressionFeatures, ProgressCallback, StopCallback, align_chunk, encoder_device,
                                  stabilize_track, track_faces)
from ..expression.face_track import FaceBackend
from ..expression.pdfgc import FEATURE_DIM, FanEncoder, expression_features
from .fidelity import component_errors, component_spreads, relative_errors
from .identity import RecognitionModel, arcface_crops, cosine_similarity
from .seams import FrameChanges, boundary_transitions, output_plan, seam_ratios


@dataclass
class Evaluation:
    """Per-frame results for the N output frames at `fps`, and how each part was made or why it was skipped."""

    frame_count: int
    fps: float
    driving_offset: int
    threshold: float
    face_found: np.ndarray  # [N] bool: a face was detected in the output frame
    similarity: np.ndarray | None = None  # [N] cosine to the reference, NaN where no face; None: skipped
    identity_note: str = ""
    errors: dict[str, np.ndarray] | None = None  # per component [compared], relative to the driving spread
    absolute_errors: dict[str, np.ndarray] | None = None  # per component [compared], feature units
    fidelity_note: str = ""
    changes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [N - 1] frame t -> t + 1
    boundaries: list[int] = field(default_factory=list)  # change indices at window boundaries
    seam_ratios: list[float] = field(default_factory=list)
    seam_note: str = ""
    notes: list[str] = field(default_factory=list)


def reference_embedding(image: np.ndarray, backend: FaceBackend, recognition: RecognitionModel) -> np.ndarray | None:
    """The reference portrait's embedding (RGB uint8 [H, W, 3]), or None when the backend finds no face in it."""
    track = backend.detect(np.ascontiguousarray(image)[None], reset=True)
    if not track.found[0]:
        return None
    crops = arcface_crops(torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(track.points))
    return recognition.embed(crops)[0]


def evaluate_output(
    passes: Callable[[], Iterator[torch.Tensor]],
    expected_frames: int,
    fps: float,
    driving: ExpressionFeatures,
    encoder: FanEncoder,
    backend: FaceBackend,
    reference_image: np.ndarray | None = None,
    recognition: RecognitionModel | None = None,
    identity_note: str = "",
    windows: tuple[int, int] | None = None,
    driving_offset: int = 1,
    threshold: float = 0.5,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
) -> Evaluation:
    """Evaluate the output frames that `passes()` yields (a fresh iterator of chunks [B, H, W, 3], uint8 or float
    in [0, 1], each call) against the driving performance, the reference portrait (RGB uint8) and the window
    settings (length, overlap in latent frames). Without `recognition` (or reference) identity is skipped with
    `identity_note` as the reason; without `windows` the seam check is skipped."""
    if driving_offset < 0:
        raise ValueError(f"driving_offset must be 0 or more, got {driving_offset}")
    progress = TwoPassProgress(expected_frames, on_progress)
    reference = None
    if recognition is not None and reference_image is not None:
        reference = reference_embedding(reference_image, backend, recognition)
        if reference is None:
            identity_note = "skipped: no face found in reference_image; use a portrait with the face clearly visible"
    changes = FrameChanges()

    def measured() -> Iterator[torch.Tensor]:
        for chunk in passes():
            changes.add(chunk)
            yield chunk

    track = track_faces(measured(), backend, progress, should_stop)
    count = int(track.found.shape[0])
    result = Evaluation(frame_count=count, fps=fps, driving_offset=driving_offset, threshold=threshold,
                        face_found=track.found.copy(), identity_note=identity_note, changes=changes.values)
    _check_seams(result, windows)
    if not track.found.any():
        result.fidelity_note = f"skipped: no face found in any of the {count} output frames"
        if reference is not None:
            result.similarity = np.full(count, np.nan)
            result.identity_note = f"{recognition.description}; no face in any output frame"
        return result
    progress.finish_first_pass(count)
    stable = stabilize_track(track, fps, driving.smoothing)
    transforms = similarity_to_template(torch.from_numpy(stable.points).to(torch.float64))
    points = torch.from_numpy(stable.points)
    features = torch.empty(count, FEATURE_DIM, dtype=torch.float32)
    similarity = np.full(count, np.nan)
    device = encoder_device(encoder)
    start = 0
    for chunk in passes():
        if should_stop is not None:
            should_stop()
        if start >= count:
            break  # the file grew since the first pass: only the frames measured there are evaluated
        stop = min(start + chunk.shape[0], count)
        chunk = chunk[: stop - start]
        features[start:stop] = expression_features(encoder, align_chunk(chunk, transforms[start:stop],
                                                                        device)).float().cpu()
        rows = np.flatnonzero(track.found[start:stop])
        if reference is not None and rows.size:
            index = torch.from_numpy(rows)
            crops = arcface_crops(chunk[index], points[start:stop][index])
            similarity[start + rows] = cosine_similarity(recognition.embed(crops), reference)
        progress(stop - start)
        start = stop
    if start < count:
        raise ValueError(f"the output video yielded {start} frames on the second pass but {count} on the first; the "
                         "file changed while it was read: evaluate it again once it is written")
    if reference is not None:
        result.similarity = similarity
        result.identity_note = recognition.description
    _compare_expressions(result, features.numpy(), driving)
    return result


def _compare_expressions(result: Evaluation, features: np.ndarray, driving: ExpressionFeatures) -> None:
    available = driving.features.shape[0] - result.driving_offset
    compared = min(result.frame_count, available)
    if compared < 1:
        result.fidelity_note = (f"skipped: driving_offset {result.driving_offset} is past the driving performance's "
                                f"{driving.features.shape[0]} frames")
        return
    wanted = driving.features[result.driving_offset:result.driving_offset + compared].double().numpy()
    result.absolute_errors = component_errors(features[:compared], wanted)
    result.errors = relative_errors(result.absolute_errors, component_spreads(wanted))
    if compared < result.frame_count:
        result.notes.append(f"the output has {result.frame_count} frames but the driving performance only "
                            f"{available} from frame {result.driving_offset}: expressions compared on the first "
                            f"{compared}")


def _check_seams(result: Evaluation, windows: tuple[int, int] | None) -> None:
    if windows is None:
        result.seam_note = "skipped: connect the windows the sampler used"
        return
    length, overlap = windows
    plan = output_plan(result.frame_count, result.driving_offset, length, overlap)
    result.boundaries = boundary_transitions(plan, result.frame_count, result.driving_offset)
    result.seam_ratios = seam_ratios(result.changes, result.boundaries)
    if not result.boundaries:
        result.seam_note = f"{len(plan.windows)} window(s): no boundary inside the video"
