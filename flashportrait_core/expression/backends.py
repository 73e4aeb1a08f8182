"""Choosing the face backend: flashportrait (the published face files), insightface (SCRFD from a model pack),
MediaPipe (bundled, offline), or `auto`.

`auto` takes flashportrait when face_det.onnx and face_landmark.onnx are both in a flashportrait model folder (and
onnxruntime and OpenCV are installed): those are the published crops. Else insightface when a pack with a detector
is found and onnxruntime is installed, else MediaPipe. It says which and why in its description. A backend that
cannot run is a clear error naming what to install or where to put which file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .face_track import FaceBackend
from .flashportrait_backend import (FaceFiles, FlashPortraitFaceFilesNotFoundError,
                                    FlashPortraitFacesUnavailableError, find_face_files, import_runtime)
from .insightface_backend import (InsightFacePackNotFoundError, InsightFaceUnavailableError, find_detector,
                                  import_onnxruntime, pack_files)
from .mediapipe_backend import MediaPipeUnavailableError, import_mediapipe

BACKEND_CHOICES = ("auto", "flashportrait", "mediapipe", "insightface")


class FaceBackendUnavailableError(RuntimeError):
    """No face backend can run here."""


@dataclass(frozen=True)
class FaceBackendChoice:
    """A resolved backend: its name, the detector file for insightface, the face files for flashportrait, and a
    line for the user."""

    name: str  # "flashportrait", "mediapipe" or "insightface"
    detector_path: str | None = None
    description: str = ""
    face_files: FaceFiles | None = None

    def create(self, providers: Sequence[str] | None = None) -> FaceBackend:
        """A fresh backend instance (use it as a context manager). `providers`: onnxruntime providers."""
        if self.name == "flashportrait":
            from .flashportrait_backend import FlashPortraitFaceBackend

            return FlashPortraitFaceBackend(self.face_files, providers=providers)
        if self.name == "insightface":
            from .insightface_backend import InsightFaceBackend

            return InsightFaceBackend(self.detector_path, providers=providers)
        from .mediapipe_backend import MediaPipeFaceBackend

        return MediaPipeFaceBackend()


def _flashportrait(folders: Sequence[str | os.PathLike[str]]) -> FaceBackendChoice:
    files = find_face_files(folders)
    import_runtime()
    return FaceBackendChoice("flashportrait", str(files.detector), f"flashportrait ({files.label})", files)


def _insightface(roots: Sequence[str | os.PathLike[str]], pack: str | None) -> FaceBackendChoice:
    import_onnxruntime()
    detector = find_detector(roots, pack)
    return FaceBackendChoice("insightface", str(detector), f"insightface ({pack_files(detector)})")


def _chosen_by_auto(choice: FaceBackendChoice) -> FaceBackendChoice:
    return FaceBackendChoice(choice.name, choice.detector_path, f"{choice.description}, chosen by auto",
                             choice.face_files)


def resolve_face_backend(choice: str, insightface_roots: Sequence[str | os.PathLike[str]] = (),
                         pack: str | None = None,
                         flashportrait_folders: Sequence[str | os.PathLike[str]] = ()) -> FaceBackendChoice:
    """`choice` in BACKEND_CHOICES -> the backend that will run, checked to be usable now.

    `flashportrait_folders`: ComfyUI's flashportrait model folders, where the published face files live.
    """
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"face backend must be one of {', '.join(BACKEND_CHOICES)}, got {choice!r}")
    if choice == "flashportrait":
        if not flashportrait_folders:
            raise FlashPortraitFaceFilesNotFoundError(
                "no flashportrait model folder to search: put face_det.onnx and face_landmark.onnx in "
                "models/flashportrait/")
        return _flashportrait(flashportrait_folders)
    if choice == "insightface":
        if not insightface_roots:
            raise InsightFacePackNotFoundError("no insightface folder to search: put a pack in "
                                               "models/insightface/models/<pack>/")
        return _insightface(insightface_roots, pack)
    if choice == "mediapipe":
        import_mediapipe()
        return FaceBackendChoice("mediapipe", None, "mediapipe")
    reasons = []
    if flashportrait_folders:
        try:
            return _chosen_by_auto(_flashportrait(flashportrait_folders))
        except (FlashPortraitFaceFilesNotFoundError, FlashPortraitFacesUnavailableError) as error:
            reasons.append(str(error))
    if insightface_roots:
        try:
            return _chosen_by_auto(_insightface(insightface_roots, pack))
        except (InsightFacePackNotFoundError, InsightFaceUnavailableError) as error:
            reasons.append(str(error))
    else:
        reasons.append("no insightface folder to search")
    try:
        import_mediapipe()
    except MediaPipeUnavailableError as error:
        raise FaceBackendUnavailableError(
            f"no face backend can run: {error}; or for the other backends: {'; '.join(reasons)}") from error
    why = "; ".join(reason.split(":")[0] for reason in reasons)
    return FaceBackendChoice("mediapipe", None, f"mediapipe, chosen by auto ({why})")
