"""The drift monitor's text: each measure summed up, and the stretches of the video where it is worst."""

from __future__ import annotations

import numpy as np

from ..expression.edit import LABELS
from .monitor import Evaluation
from .seams import SEAM_RATIO

STRETCHES_LISTED = 3


def stretches(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-d mask, longest first (earlier first among equals)."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
    return sorted(runs, key=lambda run: (run[0] - run[1], run[0]))


def worst_stretch(values: np.ndarray, width: int) -> tuple[int, int, float]:
    """The `width` consecutive frames (fewer when the video is shorter) with the highest mean: start, stop, mean."""
    width = max(1, min(width, values.shape[0]))
    sums = np.convolve(values, np.ones(width), mode="valid")
    start = int(np.argmax(sums))
    return start, start + width, float(sums[start] / width)


def _span(start: int, stop: int, fps: float) -> str:
    frames = f"frame {start}" if stop - start == 1 else f"frames {start}-{stop - 1}"
    return f"{frames} ({start / fps:.2f}-{stop / fps:.2f} s)"


def _identity(evaluation: Evaluation) -> str:
    similarity = evaluation.similarity
    if similarity is None:
        return f"identity: {evaluation.identity_note}"
    valid = np.isfinite(similarity)
    if not valid.any():
        return f"identity ({evaluation.identity_note}): no face to compare"
    values = similarity[valid]
    lowest = int(np.nanargmin(similarity))
    text = (f"identity ({evaluation.identity_note}): cosine to the reference median {np.median(values):.3f}, "
            f"mean {values.mean():.3f}, lowest {similarity[lowest]:.3f} at frame {lowest} "
            f"({lowest / evaluation.fps:.2f} s)")
    below = valid & (np.nan_to_num(similarity, nan=np.inf) < evaluation.threshold)
    if not below.any():
        return f"{text}; no frame below {evaluation.threshold:g}"
    runs = stretches(below)
    listed = ", ".join(f"{_span(a, b, evaluation.fps)}, lowest {np.min(similarity[a:b]):.3f}"
                       for a, b in runs[:STRETCHES_LISTED])
    return (f"{text}; {int(below.sum())} frame(s) below {evaluation.threshold:g} in {len(runs)} stretch(es), "
            f"longest: {listed}")


def _fidelity(evaluation: Evaluation) -> str:
    if evaluation.errors is None:
        return f"expression fidelity: {evaluation.fidelity_note}"
    width = max(1, int(round(evaluation.fps)))
    parts = []
    for name, errors in evaluation.errors.items():
        start, stop, mean = worst_stretch(errors, width)
        parts.append(f"{LABELS[name]} {errors.mean():.3f} (absolute {evaluation.absolute_errors[name].mean():.4g}; "
                     f"worst {mean:.3f} at {_span(start, stop, evaluation.fps)})")
    compared = next(iter(evaluation.errors.values())).shape[0]
    return (f"expression fidelity on {compared} frames (error relative to the driving motion, 0 = exact): "
            + "; ".join(parts))


def _seams(evaluation: Evaluation) -> str:
    if not evaluation.boundaries:
        return f"seams: {evaluation.seam_note}"
    ratios = np.asarray(evaluation.seam_ratios)
    worst = int(np.argmax(ratios))
    at = evaluation.boundaries[worst]
    text = (f"seams: {len(ratios)} window boundary(ies) at frame pairs {evaluation.boundaries}; change there "
            f"{np.median(ratios):.2f}x the nearby frames' (median), worst {ratios[worst]:.2f}x at frames "
            f"{at}-{at + 1} ({(at + 1) / evaluation.fps:.2f} s)")
    seams = [t for t, ratio in zip(evaluation.boundaries, ratios) if ratio > SEAM_RATIO]
    return f"{text}; {len(seams)} above {SEAM_RATIO:g}x" + (f": frame pairs {seams}" if seams else "")


def _faces(evaluation: Evaluation) -> str:
    found = evaluation.face_found
    text = f"faces: found in {int(found.sum())} of {evaluation.frame_count} output frames"
    missing = stretches(~found)
    if missing:
        text += "; none in " + ", ".join(_span(a, b, evaluation.fps) for a, b in missing[:STRETCHES_LISTED])
    return text


def evaluation_report(evaluation: Evaluation) -> str:
    """Several lines: frames, faces, identity, expression fidelity, seams, then notes."""
    head = (f"{evaluation.frame_count} output frames at {evaluation.fps:g} fps, output frame 0 = driving frame "
            f"{evaluation.driving_offset}")
    return "\n".join([head, _faces(evaluation), _identity(evaluation), _fidelity(evaluation), _seams(evaluation),
                      *evaluation.notes])
