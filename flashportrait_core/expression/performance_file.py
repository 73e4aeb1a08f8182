"""A driving performance (ExpressionFeatures) as one small safetensors file, and back.

The tensors (features, face points, boxes, found flags, dense landmarks when there are any) are stored as they
are, so a load gives the saved performance bit for bit; the rest (frame rate, frame counts, source video, face
backend, the edits applied, notes) is JSON in the file's metadata. Loading needs no PD-FGC model and no face
backend: a shared workflow plus this file reproduces the emotion conditioning.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .extract import ExpressionFeatures
from .pdfgc import FEATURE_DIM

FORMAT_NAME = "flashportrait.expressions"
FORMAT_VERSION = 1
METADATA_KEY = "performance"
EXTENSION = ".safetensors"
_REQUIRED = ("features", "points", "boxes", "found")
_SAVE_HINT = "save one with FlashPortrait Save Expressions, or pick another file"


class PerformanceFileError(ValueError):
    """The file is not a readable FlashPortrait expressions file; the message says why and what to do."""


def _tensors(expressions: ExpressionFeatures) -> dict[str, torch.Tensor]:
    tensors = {"features": expressions.features, "points": expressions.points, "boxes": expressions.boxes,
               "found": expressions.found.to(torch.bool)}
    if expressions.landmarks is not None:
        tensors["landmarks"] = expressions.landmarks
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def _metadata(expressions: ExpressionFeatures) -> dict[str, Any]:
    return {
        "frame_count": int(expressions.features.shape[0]),
        "fps": float(expressions.fps),
        "source_fps": float(expressions.source_fps),
        "source_frames": int(expressions.source_frames),
        "smoothing": float(expressions.smoothing),
        "frame_size": [int(side) for side in expressions.frame_size],
        "filled_frames": [int(index) for index in expressions.filled_frames],
        "source": expressions.source,
        "face_backend": expressions.face_backend,
        "edits": list(expressions.edits),
        "notes": list(expressions.notes),
    }


def save_performance(path: str | os.PathLike[str], expressions: ExpressionFeatures) -> Path:
    """Write `expressions` to a new file at `path`; an existing file is never replaced (FileExistsError)."""
    features = expressions.features
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] < 1:
        raise ValueError(f"expressions.features must be [frames, {FEATURE_DIM}], got {list(features.shape)}; "
                         "connect FlashPortrait Extract Expressions or an edit of its output")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("expressions.features hold NaN or infinite values; extract the expressions again")
    payload = save(_tensors(expressions), metadata={
        "format": FORMAT_NAME, "version": str(FORMAT_VERSION), METADATA_KEY: json.dumps(_metadata(expressions))})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as file:  # "x": fails rather than overwrite
        file.write(payload)
    return path


def free_path(folder: str | os.PathLike[str], name: str) -> Path:
    """`folder/name.safetensors`, or `name_00001.safetensors`, ... : the first that does not exist yet."""
    folder = Path(folder)
    candidate = folder / f"{name}{EXTENSION}"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{name}_{counter:05}{EXTENSION}"
        counter += 1
    return candidate


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"expressions file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                kind = f"its format is {metadata['format']!r}" if metadata.get("format") else \
                    f"it holds {', '.join(sorted(file.keys())[:4]) or 'no tensors'} and no FlashPortrait metadata"
                raise PerformanceFileError(f"{path.name} is not a FlashPortrait expressions file ({kind}); "
                                           f"{_SAVE_HINT}")
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise PerformanceFileError(f"cannot read {path.name} as an expressions file ({error}): the file is damaged "
                                   f"or not a safetensors file; {_SAVE_HINT}") from error
    return metadata, tensors


def _info(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    try:
        version = int(metadata.get("version", ""))
    except ValueError:
        version = -1
    if version < 1:
        raise PerformanceFileError(f"{path.name} has no valid format version ({metadata.get('version')!r}); "
                                   f"the file is damaged: {_SAVE_HINT}")
    if version > FORMAT_VERSION:
        raise PerformanceFileError(f"{path.name} was saved in expressions format {version}, this pack reads "
                                   f"format {FORMAT_VERSION}: update the FlashPortrait pack")
    try:
        info = json.loads(metadata.get(METADATA_KEY, ""))
    except json.JSONDecodeError as error:
        raise PerformanceFileError(f"{path.name}: its metadata is damaged ({error}); {_SAVE_HINT}") from error
    if not isinstance(info, dict):
        raise PerformanceFileError(f"{path.name}: its metadata is damaged (not a JSON object); {_SAVE_HINT}")
    return info


def _check(path: Path, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    def refuse(problem: str) -> None:
        raise PerformanceFileError(f"{path.name} is damaged: {problem}; {_SAVE_HINT}")

    missing = [name for name in _REQUIRED if name not in tensors]
    if missing:
        refuse(f"it lacks {', '.join(missing)}")
    features = tensors["features"]
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or features.shape[0] < 1:
        refuse(f"features are {list(features.shape)}, not [frames, {FEATURE_DIM}]")
    count = features.shape[0]
    shapes = {"points": (count, 5, 2), "boxes": (count, 4), "found": (count,)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            refuse(f"{name} are {list(tensors[name].shape)}, expected {list(shape)} for {count} frames")
    landmarks = tensors.get("landmarks")
    if landmarks is not None and (landmarks.ndim != 3 or landmarks.shape[0] != count or landmarks.shape[2] != 2):
        refuse(f"landmarks are {list(landmarks.shape)}, expected [{count}, points, 2]")
    if any(not tensors[name].is_floating_point() for name in ("features", "points", "boxes")) \
            or tensors["found"].dtype != torch.bool:
        refuse("a tensor has the wrong type")
    if not bool(torch.isfinite(features).all()):
        refuse("its features hold NaN or infinite values")
    if info.get("frame_count") != count:
        refuse(f"its metadata says {info.get('frame_count')} frames, the tensors hold {count}")
    fps = info.get("fps")
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        refuse(f"its frame rate is {fps!r}")


def load_performance(path: str | os.PathLike[str]) -> ExpressionFeatures:
    """The performance saved at `path`. A foreign, damaged or newer-format file is a PerformanceFileError."""
    path = Path(path)
    metadata, tensors = _read(path)
    info = _info(path, metadata)
    _check(path, info, tensors)
    return ExpressionFeatures(
        features=tensors["features"], points=tensors["points"], boxes=tensors["boxes"], found=tensors["found"],
        filled_frames=[int(index) for index in info.get("filled_frames", [])],
        fps=float(info["fps"]), source_fps=float(info.get("source_fps", info["fps"])),
        source_frames=int(info.get("source_frames", 0)), smoothing=float(info.get("smoothing", 0.0)),
        frame_size=tuple(int(side) for side in info.get("frame_size", (0, 0))),
        notes=[str(note) for note in info.get("notes", [])], landmarks=tensors.get("landmarks"),
        source=str(info.get("source", "")), face_backend=str(info.get("face_backend", "")),
        edits=[str(edit) for edit in info.get("edits", [])])


def describe(expressions: ExpressionFeatures) -> str:
    """One line for a report: frames, rate, source, face backend and the edits applied."""
    parts = [f"{expressions.features.shape[0]} frames at {expressions.fps:g} fps"
             + (f" from {expressions.source}" if expressions.source else "")]
    if expressions.face_backend:
        parts.append(f"faces: {expressions.face_backend}")
    parts.append("edits: " + ("; ".join(expressions.edits) if expressions.edits else "none"))
    return "; ".join(parts)
