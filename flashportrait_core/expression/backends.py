"""Choosing the face backend: MediaPipe (bundled, offline), insightface (SCRFD from a model pack), or `auto`.

`auto` takes insightface when a pack with a detector is found and onnxruntime is installed, else MediaPipe, and
says which and why in its description. A backend that cannot run is a clear error naming what to install or
where to put which file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .face_track import FaceBackend
from .insightface_backend import (InsightFacePackNotFoundError, InsightFaceUnavailableError, find_detector,
                                  import_onnxruntime, pack_files)
from .mediapipe_backend import MediaPipeUnavailableError, import_mediapipe

BACKEND_CHOICES = ("auto", "mediapipe", "insightface")


class FaceBackendUnavailableError(RuntimeError):
    """No face backend can run here."""


@dataclass(frozen=True)
class FaceBackendChoice:
    """A resolved backend: its name, the detector file for insightface, and a line for the user."""

    name: str  # "mediapipe" or "insightface"
    detector_path: str | None = None
    description: str = ""

    def create(self, providers: Sequence[str] | None = None) -> FaceBackend:
        """A fresh backend instance (use it as a context manager). `providers`: onnxruntime providers."""
        if self.name == "insightface":
            from .insightface_backend import InsightFaceBackend

            return InsightFaceBackend(self.detector_path, providers=providers)
        from .mediapipe_backend import MediaPipeFaceBackend

        return MediaPipeFaceBackend()


def _insightface(roots: Sequence[str | os.PathLike[str]], pack: str | None) -> FaceBackendChoice:
    import_onnxruntime()
    detector = find_detector(roots, pack)
    return FaceBackendChoice("insightface", str(detector), f"insightface ({pack_files(detector)})")


def resolve_face_backend(choice: str, insightface_roots: Sequence[str | os.PathLike[str]] = (),
                         pack: str | None = None) -> FaceBackendChoice:
    """`choice` in BACKEND_CHOICES -> the backend that will run, checked to be usable now."""
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"face backend must be one of {', '.join(BACKEND_CHOICES)}, got {choice!r}")
    if choice == "insightface":
        if not insightface_roots:
            raise InsightFacePackNotFoundError("no insightface folder to search: put a pack in "
                                               "models/insightface/models/<pack>/")
        return _insightface(insightface_roots, pack)
    if choice == "mediapipe":
        import_mediapipe()
        return FaceBackendChoice("mediapipe", None, "mediapipe")
    reasons = []
    if insightface_roots:
        try:
            choice_made = _insightface(insightface_roots, pack)
            return FaceBackendChoice(choice_made.name, choice_made.detector_path,
                                     f"{choice_made.description}, chosen by auto")
        except (InsightFacePackNotFoundError, InsightFaceUnavailableError) as error:
            reasons.append(str(error))
    else:
        reasons.append("no insightface folder to search")
    try:
        import_mediapipe()
    except MediaPipeUnavailableError as error:
        raise FaceBackendUnavailableError(
            f"no face backend can run: {error}; or for insightface: {reasons[0]}") from error
    first_reason = reasons[0].split(":")[0]
    return FaceBackendChoice("mediapipe", None, f"mediapipe, chosen by auto ({first_reason})")
