"""Face backend on MediaPipe's offline face mesh (0.10.x `solutions` API, models bundled in the wheel).

Five points per frame: iris centres (refined mesh 468 = image-left eye, 473 = image-right eye), nose tip (1),
mouth corners (61 image-left, 291 image-right). Frames are processed as a video (tracking mode). When the mesh
finds no face in the full frame (small faces: the mesh's own detector is short-range), a full-range face detector
locates the face and the mesh runs on a square window around it; the window is kept while the face stays in it.

One face is followed through the video: the largest when tracking starts, then in each frame the face nearest
to where it was last seen, even when another face appears or grows larger (no switching between people). When it
has been out of sight for `REACQUIRE_AFTER_FRAMES` frames, the largest face is taken again.

Speed: a mesh allowed several faces runs its face detector on every frame while it tracks fewer faces than it
may, looking for more. So once the followed face is found, a second mesh allowed one face takes over as soon
as it finds that same face: it only tracks (no detector) while the face stays, and tracking keeps to the
face it has even when another appears. Where it loses the face, the several-face mesh looks again.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .face_track import REACQUIRE_AFTER_FRAMES, FaceTrack, choose_face

MESH_POINT_INDICES = (468, 473, 1, 61, 291)
MESH_LANDMARKS = 478  # the refined mesh: 468 face points + 2 x 5 iris points, all kept for the preview
MEDIAPIPE_PIN = "mediapipe==0.10.21"
# Window side relative to the face box, and the smallest window the mesh sees (small crops are upscaled).
DETECTION_WINDOW_SCALE = 2.2
LANDMARK_WINDOW_SCALE = 1.8
MIN_WINDOW_PIXELS = 256
# Re-centre the window when the face drifts this far (fraction of the side) or changes size this much.
WINDOW_DRIFT = 0.15
WINDOW_RESIZE = 0.25


class MediaPipeUnavailableError(ImportError):
    """MediaPipe (the legacy `solutions` API) is not installed."""


def import_mediapipe() -> ModuleType:
    try:
        import mediapipe
        from mediapipe.python import solutions  # noqa: F401  (0.10.x legacy API)
    except ImportError as error:
        raise MediaPipeUnavailableError(
            f"the MediaPipe face backend needs MediaPipe with its legacy solutions API: pip install {MEDIAPIPE_PIN} "
            "(note: it pins numpy<2)"
        ) from error
    return mediapipe


def _check_frames(frames_uint8: np.ndarray) -> None:
    if not isinstance(frames_uint8, np.ndarray):
        raise TypeError(f"frames_uint8 must be a numpy array [B, H, W, 3], got {type(frames_uint8).__name__}")
    if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"frames_uint8 must have shape [B, H, W, 3] (RGB), got {list(frames_uint8.shape)}")
    if frames_uint8.dtype != np.uint8:
        raise ValueError(f"frames_uint8 must be uint8 RGB, got dtype {frames_uint8.dtype}")


def _landmark_array(face_landmarks: Any, width: float, height: float) -> np.ndarray:
    """All mesh landmarks of one face in pixels, [N, 2]."""
    return np.array([(p.x * width, p.y * height) for p in face_landmarks.landmark], dtype=np.float64)


def _box_of(landmarks: np.ndarray) -> np.ndarray:
    return np.concatenate([landmarks.min(axis=0), landmarks.max(axis=0)])


def _window_around(box: np.ndarray, scale: float) -> np.ndarray:
    """Square window (x0, y0, side) centred on a face box."""
    side = max(box[2] - box[0], box[3] - box[1]) * scale
    centre = (box[:2] + box[2:]) / 2
    return np.array([centre[0] - side / 2, centre[1] - side / 2, side], dtype=np.float64)


def _crop_window(frame: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, float]:
    """Cut a square window (zero outside the frame), upscaled to at least MIN_WINDOW_PIXELS; returns crop, scale."""
    import cv2

    x0, y0, side = (int(round(v)) for v in window)
    side = max(side, 1)
    height, width = frame.shape[:2]
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if fx1 > fx0 and fy1 > fy0:
        crop[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0] = frame[fy0:fy1, fx0:fx1]
    scale = 1.0
    if side < MIN_WINDOW_PIXELS:
        scale = MIN_WINDOW_PIXELS / side
        crop = cv2.resize(crop, (MIN_WINDOW_PIXELS, MIN_WINDOW_PIXELS), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(crop), scale


def _window_still_fits(window: np.ndarray, box: np.ndarray) -> bool:
    proposed = _window_around(box, LANDMARK_WINDOW_SCALE)
    side = window[2]
    drift = np.abs((proposed[:2] + proposed[2] / 2) - (window[:2] + side / 2)).max() / side
    return drift <= WINDOW_DRIFT and abs(proposed[2] / side - 1.0) <= WINDOW_RESIZE


class MediaPipeFaceBackend:
    """MediaPipe face mesh + full-range face detection fallback; follows one face (the largest at the start)."""

    def __init__(self, max_faces: int = 4, min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5) -> None:
        if max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {max_faces}")
        self._mp = import_mediapipe()
        self._max_faces = max_faces
        self._min_detection_confidence = min_detection_confidence
        self._min_tracking_confidence = min_tracking_confidence
        self._frame_mesh: Any = None
        self._tracking_mesh: Any = None  # one face, full frames: follows the face without its detector
        self._tracking_followed = False  # whether the tracking mesh holds the followed face
        self._handover_wait = 0  # frames to wait before the tracking mesh may try again, after it found another face
        self._window_mesh: Any = None
        self._detector: Any = None
        self._window: np.ndarray | None = None
        self._followed: np.ndarray | None = None  # box of the followed face where last seen
        self._frames_unseen = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _new_mesh(self, max_faces: int) -> Any:
        return self._mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=max_faces,
            refine_landmarks=True,
            min_detection_confidence=self._min_detection_confidence,
            min_tracking_confidence=self._min_tracking_confidence,
        )

    def reset(self) -> None:
        """Forget tracking state: the next frame starts a new video."""
        self.close()
        self._frame_mesh = self._new_mesh(self._max_faces)
        self._tracking_mesh = self._new_mesh(1)
        self._tracking_followed = False
        self._handover_wait = 0
        self._window_mesh = self._new_mesh(1)
        self._detector = self._mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=self._min_detection_confidence
        )
        self._window = None
        self._followed = None
        self._frames_unseen = 0

    def close(self) -> None:
        for graph in (self._frame_mesh, self._tracking_mesh, self._window_mesh, self._detector):
            if graph is not None:
                graph.close()
        self._frame_mesh = self._tracking_mesh = self._window_mesh = self._detector = None
        self._window = None

    def __enter__(self) -> MediaPipeFaceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    # -- detection -------------------------------------------------------------------------------------------
    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack:
        """RGB uint8 frames [B, H, W, 3] of one video, in order -> FaceTrack (pixels).

        reset=False continues tracking from the previous call (feed a long video in chunks).
        """
        _check_frames(frames_uint8)
        if reset or self._frame_mesh is None:
            self.reset()
        track = FaceTrack.empty(frames_uint8.shape[0], landmark_count=MESH_LANDMARKS)
        for index, frame in enumerate(frames_uint8):
            landmarks = self._detect_frame(np.ascontiguousarray(frame))
            self._remember(landmarks)
            if landmarks is not None:
                track.landmarks[index] = landmarks[:MESH_LANDMARKS]
                track.points[index] = landmarks[list(MESH_POINT_INDICES)]
                track.boxes[index] = _box_of(landmarks[:468])
                track.found[index] = True
        return track

    def _remember(self, landmarks: np.ndarray | None) -> None:
        """Update the followed face; forget it after REACQUIRE_AFTER_FRAMES frames out of sight."""
        if landmarks is not None:
            self._followed = _box_of(landmarks[:468])
            self._frames_unseen = 0
            return
        self._frames_unseen += 1
        if self._frames_unseen >= REACQUIRE_AFTER_FRAMES:
            self._followed = None
            self._window = None

    def _detect_frame(self, frame: np.ndarray) -> np.ndarray | None:
        if self._window is None:
            landmarks = self._tracked_face(frame)
            if landmarks is not None:
                return landmarks
            landmarks = self._chosen_mesh_face(self._frame_mesh, frame, self._followed)
            if landmarks is not None:
                self._hand_over(frame, landmarks)
                return landmarks
        self._tracking_followed = False
        return self._detect_in_window(frame)

    def _tracked_face(self, frame: np.ndarray) -> np.ndarray | None:
        """The followed face from the one-face mesh while that mesh holds it; None otherwise."""
        if not self._tracking_followed:
            return None
        landmarks = self._chosen_mesh_face(self._tracking_mesh, frame, self._followed)
        self._tracking_followed = landmarks is not None
        if landmarks is None:
            # The several-face mesh last saw a frame from before the take-over: start it afresh, so that it
            # looks from a detection rather than from that old position.
            self._frame_mesh.close()
            self._frame_mesh = self._new_mesh(self._max_faces)
        return landmarks

    def _hand_over(self, frame: np.ndarray, landmarks: np.ndarray) -> None:
        """Let the one-face mesh take over if, on this frame, it finds the face the several-face mesh chose."""
        if self._handover_wait > 0:
            self._handover_wait -= 1
            return
        same = self._chosen_mesh_face(self._tracking_mesh, frame, _box_of(landmarks[:468]))
        self._tracking_followed = same is not None
        if same is None:  # it holds another face: start it afresh later
            self._tracking_mesh.close()
            self._tracking_mesh = self._new_mesh(1)
            self._handover_wait = REACQUIRE_AFTER_FRAMES

    def _chosen_mesh_face(self, mesh: Any, image: np.ndarray, previous: np.ndarray | None,
                          offset: np.ndarray | None = None, scale: float = 1.0) -> np.ndarray | None:
        """Landmarks (frame pixels) of the followed face among the mesh's faces in `image`.

        `image` may be a window of the frame: landmarks map back with `/ scale + offset`.
        """
        result = mesh.process(image)
        if not result.multi_face_landmarks:
            return None
        height, width = image.shape[:2]
        faces = [_landmark_array(face, width, height) for face in result.multi_face_landmarks]
        if offset is not None:
            faces = [face / scale + offset for face in faces]
        chosen = choose_face([_box_of(face[:468]) for face in faces], previous)
        return None if chosen is None else faces[chosen]

    def _largest_mesh_face(self, mesh: Any, image: np.ndarray) -> np.ndarray | None:
        """Landmarks of the largest face the mesh finds in `image`, whatever was followed before."""
        return self._chosen_mesh_face(mesh, image, None)

    def _detect_in_window(self, frame: np.ndarray) -> np.ndarray | None:
        fresh = self._window is None
        if fresh:
            self._window = self._window_from_detector(frame)
            if self._window is None:
                return None
        landmarks = self._mesh_in_window(frame)
        if landmarks is None and not fresh:
            # The face left the kept window: look for it again over the whole frame.
            self._window = self._window_from_detector(frame)
            landmarks = self._mesh_in_window(frame) if self._window is not None else None
        if landmarks is None:
            self._window = None
            return None
        box = _box_of(landmarks[:468])
        if not _window_still_fits(self._window, box):
            self._window = _window_around(box, LANDMARK_WINDOW_SCALE)
        return landmarks

    def _mesh_in_window(self, frame: np.ndarray) -> np.ndarray | None:
        crop, scale = _crop_window(frame, self._window)
        return self._chosen_mesh_face(self._window_mesh, crop, self._followed, self._window[:2], scale)

    def _window_from_detector(self, frame: np.ndarray) -> np.ndarray | None:
        result = self._detector.process(frame)
        if not result.detections:
            return None
        height, width = frame.shape[:2]
        boxes = []
        for detection in result.detections:
            rel = detection.location_data.relative_bounding_box
            x0, y0 = rel.xmin * width, rel.ymin * height
            boxes.append(np.array([x0, y0, x0 + rel.width * width, y0 + rel.height * height]))
        # The detector's box and the mesh's box of one face differ a little in size; the follow test allows it.
        chosen = choose_face(boxes, self._followed)
        return None if chosen is None else _window_around(boxes[chosen], DETECTION_WINDOW_SCALE)
