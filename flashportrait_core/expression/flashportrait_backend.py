"""Face backend on the face files shipped with FlashPortrait: `face_det.onnx` + `face_landmark.onnx`.

This is the published extraction's own face pipeline, so the crops (and with them the expression features) are
the ones the model was trained and evaluated with:
- Per frame, the detector finds faces (flashportrait_detector.py); each followed face gets its 222 landmarks by
  iterating the landmark model on its own crops (flashportrait_landmarks.py), starting from the previous frame's
  smoothed landmarks, or from a face box for a new face. Faces are then smoothed over time with the published
  per-region filter (landmark_smoothing.py).
- The detector's faces join the followed ones every frame. A face whose score falls below 1e-4 or whose landmarks
  span less than 96 pixels is dropped; of two faces overlapping by IoU above 0.12 the smaller is dropped. The
  frame's face is the largest.
- The whole video is tracked twice, as published: the second pass starts (and restarts after losing the face)
  from the first pass's face box of the same frame, and its smoothed landmarks are the result. Both passes run
  side by side in one reading of the video; the detector, which sees the same frame in both, runs once.
- The alignment points are landmarks 182, 202 (pupils), 36 (nose tip), 149 and 133 (mouth corners).

A frame where either pass finds no face has no face here; extraction interpolates its points from the
neighbouring frames (the published code drops such frames instead).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from .face_track import FaceTrack
from .flashportrait_detector import FaceDetector, import_cv2
from .flashportrait_landmarks import LandmarkModel
from .landmark_smoothing import LANDMARK_COUNT, LandmarkSmoother

DETECTOR_FILE = "face_det.onnx"
LANDMARK_FILE = "face_landmark.onnx"
FIVE_POINTS = (182, 202, 36, 149, 133)  # left pupil, right pupil, nose tip, left and right mouth corner
MIN_SCORE = 1e-4  # a face the landmark model scores below this is lost
MIN_FACE_PIXELS = 96  # a face whose landmarks span less (width or height) is dropped
OVERLAP_THRESHOLD = 0.12  # of two faces overlapping by more IoU, the smaller is dropped
PITCH_WEIGHT, YAW_WEIGHT, ANGLE_SCALE_DEGREES = 1.0, 0.6, 18.0  # face distance grows with the head's turn
TEMPORAL_FILTER = "the published 222-landmark filter"


class FlashPortraitFacesUnavailableError(ImportError):
    """onnxruntime or OpenCV, which the flashportrait face backend needs, is not installed."""


class FlashPortraitFaceFilesNotFoundError(FileNotFoundError):
    """face_det.onnx and face_landmark.onnx are not (both) in a flashportrait model folder."""


def import_runtime() -> ModuleType:
    """onnxruntime, checked together with OpenCV, or a clear error naming what to install."""
    try:
        import onnxruntime
    except ImportError as error:
        raise FlashPortraitFacesUnavailableError(
            "the flashportrait face backend runs face_det.onnx and face_landmark.onnx with onnxruntime: pip install "
            "onnxruntime (or onnxruntime-gpu for CUDA), or choose another face backend") from error
    try:
        import_cv2()
    except ImportError as error:
        raise FlashPortraitFacesUnavailableError(f"{error}, or choose another face backend") from error
    return onnxruntime


@dataclass(frozen=True)
class FaceFiles:
    """The two face files, and how the user sees them (relative to the model folder)."""

    detector: Path
    landmarks: Path
    label: str


def _folders_to_search(folder: Path) -> list[Path]:
    # The folder itself, then its subfolders (e.g. the downloaded repository kept as one folder).
    if not folder.is_dir():
        return []
    return [folder] + sorted(child for child in folder.iterdir() if child.is_dir())


def find_face_files(folders: Sequence[str | os.PathLike[str]]) -> FaceFiles:
    """Both face files in one of `folders` (ComfyUI's flashportrait model folders) or a subfolder of one.

    Raises FlashPortraitFaceFilesNotFoundError saying which file is missing and where to put it.
    """
    roots = [Path(folder) for folder in folders]
    if not roots:
        raise ValueError("folders must name at least one folder to search for the FlashPortrait face files")
    partial = None
    for root in roots:
        for folder in _folders_to_search(root):
            detector, landmarks = folder / DETECTOR_FILE, folder / LANDMARK_FILE
            if detector.is_file() and landmarks.is_file():
                prefix = "" if folder == root else f"{folder.name}/"
                return FaceFiles(detector, landmarks, f"{prefix}{DETECTOR_FILE} + {LANDMARK_FILE}")
            if partial is None and (detector.is_file() or landmarks.is_file()):
                partial = (folder, LANDMARK_FILE if detector.is_file() else DETECTOR_FILE)
    searched = ", ".join(str(root) for root in roots)
    if partial is not None:
        raise FlashPortraitFaceFilesNotFoundError(
            f"FlashPortrait face files incomplete: {partial[1]} is missing beside the other in {partial[0]}; put "
            f"both {DETECTOR_FILE} and {LANDMARK_FILE} from the FlashPortrait download there")
    raise FlashPortraitFaceFilesNotFoundError(
        f"FlashPortrait face files not found: put {DETECTOR_FILE} and {LANDMARK_FILE} from the FlashPortrait "
        f"download in {roots[0]}/ (beside pd_fpg.pth). Searched: {searched}")


@dataclass
class FollowedFace:
    """One face the tracker follows: its box (detector box, then its landmarks' box), the face distance that
    motion is measured in, its smoother, and its smoothed landmarks (None until first aligned)."""

    box: np.ndarray
    face_size: float
    smoother: LandmarkSmoother
    landmarks: np.ndarray | None = None

    @classmethod
    def from_box(cls, box: Sequence[float]) -> FollowedFace:
        box = np.array(box, dtype=np.float64)  # a copy: the two passes never share a box
        return cls(box=box, face_size=float(math.hypot(box[2] - box[0], box[3] - box[1])),
                   smoother=LandmarkSmoother())


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([landmarks.min(axis=0), landmarks.max(axis=0)])


def face_distance(landmarks: np.ndarray, pitch: float, yaw: float) -> float:
    """The published face distance: landmark 0 to landmark 32 (across the face outline), lengthened as the head
    turns away (pitch and yaw in radians)."""
    turn = PITCH_WEIGHT * abs(math.degrees(pitch)) + YAW_WEIGHT * abs(math.degrees(yaw))
    return float(np.linalg.norm(landmarks[0] - landmarks[32])) * (1.0 + turn / ANGLE_SCALE_DEGREES)


def box_area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    width = max(min(first[2], second[2]) - max(first[0], second[0]), 0.0)
    height = max(min(first[3], second[3]) - max(first[1], second[1]), 0.0)
    intersection = abs(width * height)
    if intersection == 0:
        return 0.0
    return float(intersection / (abs(box_area(first)) + abs(box_area(second)) - intersection))


class PublishedFaceTracker:
    """One pass of the published per-frame tracking; `step` returns the frame's face (the largest) or None."""

    def __init__(self, landmark_model: LandmarkModel) -> None:
        self.landmark_model = landmark_model
        self.faces: list[FollowedFace] = []

    def reset(self) -> None:
        self.faces = []

    def step(self, frame_bgr: np.ndarray, detections: np.ndarray, start_box: np.ndarray | None = None
             ) -> FollowedFace | None:
        """Advance by one BGR frame. `detections` [N, 4]: the detector's boxes in it; `start_box`: where to start
        when no face is followed (the detector's boxes are used when it is None)."""
        new_boxes = [start_box] if not self.faces and start_box is not None else list(detections)
        self.faces.extend(FollowedFace.from_box(box) for box in new_boxes)
        dropped: set[int] = set()
        for index, face in enumerate(self.faces):
            if face.landmarks is not None:
                result = self.landmark_model.align(frame_bgr, previous=face.landmarks)
            else:
                result = self.landmark_model.align(frame_bgr, box=face.box)
            if result.score < MIN_SCORE:
                dropped.add(index)
                continue
            face.landmarks = face.smoother(result.landmarks, face.face_size)
            face.box = landmark_box(face.landmarks)
            face.face_size = face_distance(face.landmarks, result.pitch, result.yaw)
            if min(face.box[2] - face.box[0], face.box[3] - face.box[1]) < MIN_FACE_PIXELS:
                dropped.add(index)
        self._drop_overlapping(dropped)
        self.faces = [face for index, face in enumerate(self.faces) if index not in dropped]
        if not self.faces:
            return None
        # The largest face; of equal ones the last (a stable sort's last element, as published).
        largest = max(box_area(face.box) for face in self.faces)
        return [face for face in self.faces if box_area(face.box) == largest][-1]

    def _drop_overlapping(self, dropped: set[int]) -> None:
        # The published pass, including its order: a face already dropped in this pass still drops others.
        for index, face in enumerate(self.faces):
            if index in dropped:
                continue
            for other_index, other in enumerate(self.faces):
                if other_index in dropped or other_index == index:
                    continue
                if overlap(face.box, other.box) > OVERLAP_THRESHOLD:
                    dropped.add(index if box_area(face.box) < box_area(other.box) else other_index)


def _providers(runtime: ModuleType, wanted: Sequence[str] | None) -> list[str]:
    available = runtime.get_available_providers()
    return [p for p in (wanted or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]


class FlashPortraitFaceBackend:
    """The published face pipeline on face_det.onnx + face_landmark.onnx; 222 landmarks per frame."""

    temporal_filter = TEMPORAL_FILTER  # points come out smoothed; extraction adds no filter of its own

    def __init__(self, files: FaceFiles, providers: Sequence[str] | None = None) -> None:
        runtime = import_runtime()
        for path in (files.detector, files.landmarks):
            if not path.is_file():
                raise FlashPortraitFaceFilesNotFoundError(f"FlashPortrait face file not found: {path}")
        chosen = _providers(runtime, providers)
        self.files = files
        self.detector = FaceDetector(files.detector, chosen, runtime)
        self.landmark_model = LandmarkModel(files.landmarks, chosen, runtime)
        self._first_pass = PublishedFaceTracker(self.landmark_model)
        self._second_pass = PublishedFaceTracker(self.landmark_model)
        self.description = f"flashportrait ({files.label})"

    def __enter__(self) -> FlashPortraitFaceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._first_pass.reset()
        self._second_pass.reset()

    def frame_face(self, frame_bgr: np.ndarray) -> FollowedFace | None:
        """Both passes over one more BGR frame: the second pass's face, or None."""
        detections, _ = self.detector.faces(frame_bgr)
        first = self._first_pass.step(frame_bgr, detections)
        if first is None:
            return None  # the published second pass never sees this frame
        return self._second_pass.step(frame_bgr, detections, start_box=first.box)

    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack:
        """RGB uint8 frames [B, H, W, 3] of one video, in order -> FaceTrack (frame pixels, 222 landmarks)."""
        if not isinstance(frames_uint8, np.ndarray) or frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3 \
                or frames_uint8.dtype != np.uint8:
            raise ValueError("frames_uint8 must be a uint8 RGB numpy array [B, H, W, 3]")
        if reset:
            self.reset()
        track = FaceTrack.empty(frames_uint8.shape[0], LANDMARK_COUNT)
        for index, frame in enumerate(frames_uint8):
            face = self.frame_face(np.ascontiguousarray(frame[..., ::-1]))  # the published models see BGR
            if face is not None:
                track.landmarks[index] = face.landmarks
                track.points[index] = face.landmarks[list(FIVE_POINTS)]
                track.boxes[index] = face.box
                track.found[index] = True
        return track
