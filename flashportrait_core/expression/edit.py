"""Edits of a driving performance: per-component strength, head-pose lock, relative motion, two performances
combined, trimming, speed and loops.

Every edit takes ExpressionFeatures and returns new ExpressionFeatures (the input is left as it was), so emotion
conditioning and the sampler take the result unchanged. The features are disentangled per frame (head pose 6 |
eyes 6 | emotion 30 | mouth 512), so each component can be scaled or swapped on its own. No model runs here. Each
edit appends one line to `edits`, which is saved with the performance.

Strength s of a component, around a neutral value n (the driving video's first frame, its mean, or the reference
portrait's own features): n + s * (x - n). 0 holds the component at n, 1 leaves it as driven (bit-exact), above 1
exaggerates. Relative motion adds the driving video's change since its first frame onto the reference portrait's
own features: r + s * (x - x[0]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from .extract import ExpressionFeatures
from .pdfgc import EMO_DIM, EYE_DIM, FEATURE_DIM, HEADPOSE_DIM
from .resample import resample_expressions

_EYE_END = HEADPOSE_DIM + EYE_DIM
_EMO_END = _EYE_END + EMO_DIM
COMPONENTS: dict[str, slice] = {
    "head_pose": slice(0, HEADPOSE_DIM),
    "eyes": slice(HEADPOSE_DIM, _EYE_END),
    "emotion": slice(_EYE_END, _EMO_END),
    "mouth": slice(_EMO_END, FEATURE_DIM),
}
LABELS = {"head_pose": "head pose", "eyes": "eyes", "emotion": "emotion", "mouth": "mouth"}

FIRST_FRAME, MEAN, REFERENCE = "driving first frame", "driving mean", "reference portrait"
NEUTRALS = (FIRST_FRAME, MEAN, REFERENCE)
# How two performances of different lengths are brought to one: both cut to the shorter, or the shorter one
# repeated from its start, played forth and back, or held at its last frame up to the longer one's length.
LENGTH_MODES = ("trim", "loop", "ping-pong", "hold")
_RECONCILED = {"trim": "both cut to the shorter", "loop": "the shorter one repeated from its start",
               "ping-pong": "the shorter one played forth and back", "hold": "the shorter one held at its last frame"}
LOOP_MODES = ("ping-pong", "repeat")
MAX_STRENGTH = 10.0


def reference_vector(reference: torch.Tensor) -> torch.Tensor:
    """The reference portrait's features as one [554] float32 vector (from [554] or [1, 554])."""
    if not isinstance(reference, torch.Tensor) or reference.numel() != FEATURE_DIM:
        shape = list(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
        raise ValueError(f"reference features must be one frame of {FEATURE_DIM} values, got {shape}; extract "
                         "them from the reference image with the same expression model")
    vector = reference.detach().reshape(FEATURE_DIM).to("cpu", torch.float32)
    if not bool(torch.isfinite(vector).all()):
        raise ValueError("reference features hold NaN or infinite values; extract them again")
    return vector


def neutral_features(expressions: ExpressionFeatures, neutral: str,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
    """The neutral value [554] that strengths are measured around."""
    if neutral == FIRST_FRAME:
        return expressions.features[0].clone()
    if neutral == MEAN:
        return expressions.features.double().mean(dim=0).float()
    if neutral == REFERENCE:
        if reference is None:
            raise ValueError(f"neutral '{REFERENCE}' needs the reference portrait's features: connect "
                             "reference_image and expression_model, or choose another neutral")
        return reference_vector(reference)
    raise ValueError(f"neutral must be one of {', '.join(NEUTRALS)}, got {neutral!r}")


def _with_edit(expressions: ExpressionFeatures, edit: str, **changes: object) -> ExpressionFeatures:
    return dataclasses.replace(expressions, edits=[*expressions.edits, edit], notes=list(expressions.notes),
                               **changes)


def _check_strength(name: str, strength: float) -> float:
    if not math.isfinite(strength) or not 0.0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"{name} strength must be between 0 and {MAX_STRENGTH:g} (0 = hold still, 1 = as driven), "
                         f"got {strength}")
    return float(strength)


def scale_components(expressions: ExpressionFeatures, strengths: Mapping[str, float],
                     neutral: str = FIRST_FRAME, reference: torch.Tensor | None = None,
                     relative: bool = False) -> ExpressionFeatures:
    """Each component's motion scaled by its strength (`strengths` maps names of COMPONENTS to values; a missing
    one stays 1), around `neutral`; with `relative`, the motion since the driving first frame goes onto the
    reference portrait's features (`reference`, required) and `neutral` is not used."""
    unknown = sorted(set(strengths) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; the components are {', '.join(COMPONENTS)}")
    scales = {name: _check_strength(LABELS[name], strengths.get(name, 1.0)) for name in COMPONENTS}
    if relative:
        if reference is None:
            raise ValueError("relative motion applies the driving motion onto the reference portrait's own "
                             "expression: connect reference_image and expression_model, or turn it off")
        origin, anchor = expressions.features[0], reference_vector(reference)
    else:
        if all(scale == 1.0 for scale in scales.values()):
            return expressions
        origin = anchor = neutral_features(expressions, neutral, reference)
    features = expressions.features.clone()
    for name, part in COMPONENTS.items():
        scale = scales[name]
        if scale == 1.0 and not relative:
            continue  # as driven, bit for bit
        if scale == 0.0:
            features[:, part] = anchor[part]
        else:
            features[:, part] = anchor[part] + scale * (expressions.features[:, part] - origin[part])
    strengths_text = ", ".join(f"{LABELS[name]} x{scale:g}" for name, scale in scales.items())
    edit = (f"relative motion onto the reference portrait ({strengths_text})" if relative
            else f"strength {strengths_text} around the {neutral}")
    return _with_edit(expressions, edit, features=features)


def lock_head_pose(expressions: ExpressionFeatures, reference: torch.Tensor) -> ExpressionFeatures:
    """Every frame's head pose set to the reference portrait's: only the face moves."""
    features = expressions.features.clone()
    part = COMPONENTS["head_pose"]
    features[:, part] = reference_vector(reference)[part]
    return _with_edit(expressions, "head pose locked to the reference portrait", features=features)


# -- time ---------------------------------------------------------------------------------------------------------

def _take_frames(expressions: ExpressionFeatures, index: torch.Tensor, edit: str) -> ExpressionFeatures:
    """The frames at `index` (any order, repeats allowed) as a performance of its own timeline."""
    found = expressions.found[index]
    return _with_edit(
        expressions, edit,
        features=expressions.features[index], points=expressions.points[index], boxes=expressions.boxes[index],
        found=found, filled_frames=torch.nonzero(~found).flatten().tolist(),
        landmarks=None if expressions.landmarks is None else expressions.landmarks[index],
        # The edited sequence is its own timeline from here on (previews map frame i to entry i).
        source_frames=int(index.numel()), source_fps=expressions.fps)


def extension_index(length: int, frames: int, mode: str) -> torch.Tensor:
    """Indices into a sequence of `length` frames giving `frames` frames: repeated from the start ("loop" or
    "repeat"), played forth and back ("ping-pong": 0 1 2 1 0 1 ...), or held at the last frame ("hold")."""
    if length < 1 or frames < 1:
        raise ValueError(f"lengths must be at least 1 frame, got {length} -> {frames}")
    steps = torch.arange(frames)
    if mode in ("loop", "repeat"):
        return steps % length
    if mode == "ping-pong":
        if length == 1:
            return torch.zeros(frames, dtype=torch.long)
        phase = steps % (2 * length - 2)
        return torch.where(phase < length, phase, 2 * length - 2 - phase)
    if mode == "hold":
        return steps.clamp(max=length - 1)
    raise ValueError(f"mode must be one of loop, repeat, ping-pong, hold, got {mode!r}")


def trim(expressions: ExpressionFeatures, start: int = 0, count: int = 0) -> ExpressionFeatures:
    """Frames start .. start + count - 1 (count 0 = to the end)."""
    total = expressions.features.shape[0]
    if start < 0 or count < 0:
        raise ValueError(f"start_frame and frame_count must not be negative, got {start} and {count}")
    if start >= total:
        raise ValueError(f"start_frame {start} is past the end of the performance ({total} frames, 0..{total - 1}); "
                         "lower it")
    stop = total if count == 0 else min(total, start + count)
    if start == 0 and stop == total:
        return expressions
    return _take_frames(expressions, torch.arange(start, stop), f"trimmed to frames {start}..{stop - 1} of {total}")


def change_speed(expressions: ExpressionFeatures, speed: float) -> ExpressionFeatures:
    """The performance played `speed` times as fast, at the same frame rate: resampled with linear
    interpolation in time exactly as a frame-rate conversion is (a clip at r fps played at speed s is the clip
    taken as r * s fps, converted to r)."""
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be a positive factor (1 = as driven, 2 = twice as fast), got {speed}")
    if speed == 1.0:
        return expressions
    fps, total = expressions.fps, expressions.features.shape[0]
    resampled = resample_expressions(dataclasses.replace(expressions, fps=fps * speed), fps)
    count = resampled.features.shape[0]
    return _with_edit(resampled, f"speed x{speed:g}: {total} -> {count} frames",
                      source_frames=count, source_fps=fps)


def loop(expressions: ExpressionFeatures, frames: int, mode: str = "ping-pong") -> ExpressionFeatures:
    """The performance repeated (`mode` in LOOP_MODES) to exactly `frames` frames, e.g. a short clip for a long
    video. ping-pong plays it forth and back, so there is no jump back to the first frame."""
    if mode not in LOOP_MODES:
        raise ValueError(f"loop must be one of {', '.join(LOOP_MODES)}, got {mode!r}")
    if frames < 1:
        raise ValueError(f"loop_frames must be at least 1 (the length of the looped performance), got {frames}")
    total = expressions.features.shape[0]
    return _take_frames(expressions, extension_index(total, frames, mode), f"{mode} loop: {total} -> {frames} frames")


# -- two performances ---------------------------------------------------------------------------------------------

def _offset(expressions: ExpressionFeatures, offset: int) -> tuple[ExpressionFeatures, str]:
    """Delay (offset > 0: the first frame held before it) or advance (offset < 0: its first frames dropped)."""
    total = expressions.features.shape[0]
    if offset == 0:
        return expressions, ""
    if offset < 0 and -offset >= total:
        raise ValueError(f"second_offset {offset} drops all {total} frames of the second performance; use a value "
                         f"above {-total}")
    index = torch.arange(-offset, total) if offset < 0 else torch.cat([torch.zeros(offset, dtype=torch.long),
                                                                        torch.arange(total)])
    note = f"delayed by {offset} frames" if offset > 0 else f"advanced by {-offset} frames"
    return _take_frames(expressions, index, note), note


def combine(first: ExpressionFeatures, second: ExpressionFeatures, take: Mapping[str, str],
            lengths: str = "trim", second_offset: int = 0) -> tuple[ExpressionFeatures, str]:
    """Components taken from `second` where `take[name]` is "second" (the rest from `first`), e.g. the mouth of a
    talking clip with the eyes and pose of another. Returns the result and a line saying how lengths were
    reconciled.

    `second` is first brought to `first`'s frame rate (as the extractor converts rates), then shifted by
    `second_offset` frames; then the two lengths are reconciled by `lengths` (LENGTH_MODES). Face points and
    boxes are `first`'s; a frame counts as found when it was found in both.
    """
    unknown = sorted(set(take) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; the components are {', '.join(COMPONENTS)}")
    bad = {name: source for name, source in take.items() if source not in ("first", "second")}
    if bad:
        raise ValueError(f"each component comes from 'first' or 'second', got {bad}")
    if lengths not in LENGTH_MODES:
        raise ValueError(f"lengths must be one of {', '.join(LENGTH_MODES)}, got {lengths!r}")
    taken = [name for name in COMPONENTS if take.get(name) == "second"]
    if not taken:
        return first, "nothing taken from the second performance (every component is 'first')"
    steps, second_edits = [], list(second.edits)
    if abs(second.fps - first.fps) > 1e-6 * max(first.fps, 1.0):
        before, before_fps = second.features.shape[0], second.fps
        second = resample_expressions(second, first.fps)
        steps.append(f"resampled from {before_fps:g} to {first.fps:g} fps ({before} -> "
                     f"{second.features.shape[0]} frames)")
    second, offset_note = _offset(second, second_offset)
    steps += [offset_note] if offset_note else []
    first_count, second_count = first.features.shape[0], second.features.shape[0]
    if lengths == "trim" or first_count == second_count:
        count = min(first_count, second_count)
        first_index, second_index = torch.arange(count), torch.arange(count)
    else:
        count = max(first_count, second_count)
        first_index = extension_index(first_count, count, lengths)
        second_index = extension_index(second_count, count, lengths)
    reconciled = (f"lengths: first {first_count}, second {second_count} frames -> {count}"
                  + ("" if first_count == second_count else f" ({_RECONCILED[lengths]})"))
    features = first.features[first_index].clone()
    for name in taken:
        features[:, COMPONENTS[name]] = second.features[second_index][:, COMPONENTS[name]]
    found = first.found[first_index] & second.found[second_index]
    source = second.source or "second performance"
    edit = (f"{', '.join(LABELS[name] for name in taken)} from {source}"
            + (f" ({', '.join(steps)})" if steps else "")
            + (f"; its edits: {'; '.join(second_edits)}" if second_edits else "") + f"; {reconciled}")
    # Every reconciliation keeps frames 0..count-1 in order when it does not change the first's length.
    base = first if count == first_count else _take_frames(first, first_index, "")
    result = dataclasses.replace(base, features=features, found=found,
                                 filled_frames=torch.nonzero(~found).flatten().tolist(),
                                 edits=[*first.edits, edit], notes=list(first.notes))
    return result, reconciled
