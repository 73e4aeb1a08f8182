"""Face backend on insightface's SCRFD detector (5 points per face), read from a model pack with onnxruntime.

ComfyUI users keep insightface packs as `models/insightface/models/<pack>/` (e.g. `buffalo_l` with
`det_10g.onnx`, `antelopev2` with `scrfd_10g_bnkps.onnx`). The detector's five points (eye centres, nose tip,
mouth corners, image-left first) are the PD-FGC alignment points. When the pack also holds the 106-point landmark
model (`2d106det.onnx`), the followed face's 106 landmarks are found too, for the preview only. The `insightface`
package is not needed; onnxruntime (CPU or CUDA) runs the files.

Detection follows the published SCRFD post-processing: the frame is scaled into a square input (top-left,
aspect kept), normalised as (x - 127.5) / 128 in RGB; each of the strides 8, 16, 32 has two anchors per cell whose
centre plus the predicted distances (times the stride) give the box and the points; scores >= 0.5 are kept and
non-maximum suppression at IoU 0.4 removes duplicates. Each frame is detected alone; one face is followed through
the video (`FaceFollower`).

Landmarks follow insightface's published recipe: a square crop centred on the detector's box, its side 1.5x the
box's longer side, scaled to the model's input (192), RGB; the model's outputs lie in [-1, 1] across the crop.
Whether the model normalises its own input (then the pixels go in as they are) or expects (x - 127.5) / 128 is
read from its first graph nodes, as insightface does; reading the graph needs the `onnx` package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .face_track import FaceFollower, FaceTrack

# Packs in the order `auto` prefers them (larger detectors first), then any other folder holding a detector.
PACK_PREFERENCE = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc")
DETECTOR_PREFIXES = ("det_", "scrfd")
EXAMPLE_LAYOUT = "models/insightface/models/buffalo_l/det_10g.onnx"
INPUT_SIZE = 640
SCORE_THRESHOLD = 0.5
NMS_THRESHOLD = 0.4
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
LANDMARK_PREFIX = "2d106"
LANDMARK_POINTS = 106
LANDMARK_CROP_SCALE = 1.5  # crop side over the detector box's longer side


class InsightFaceUnavailableError(ImportError):
    """onnxruntime, which runs the insightface detector, is not installed."""


class InsightFacePackNotFoundError(FileNotFoundError):
    """No insightface model pack with a face detector in the searched folders."""


def import_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as error:
        raise InsightFaceUnavailableError(
            "the insightface face backend runs its detector with onnxruntime: pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA), or choose the mediapipe backend"
        ) from error
    return onnxruntime


def _detector_in(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.suffix == ".onnx" and p.name.startswith(DETECTOR_PREFIXES))
    return files[0] if files else None


def pack_folders(root: Path, pack: str | None) -> list[Path]:
    """Where a pack may sit under an insightface root: `<root>/models/<pack>` (insightface's layout) or
    `<root>/<pack>`."""
    bases = [root / "models", root]
    if pack:
        return [base / pack for base in bases]
    folders = [base / name for name in PACK_PREFERENCE for base in bases]
    for base in bases:
        if base.is_dir():
            folders += sorted(p for p in base.iterdir() if p.is_dir() and p not in folders)
    return folders


def find_detector(roots: Sequence[str | os.PathLike[str]], pack: str | None = None) -> Path:
    """The SCRFD detector file of an insightface pack under one of `roots` (ComfyUI's models/insightface).

    `pack` names the pack folder (e.g. "buffalo_l"); None takes the first found in PACK_PREFERENCE order, then any.
    Raises InsightFacePackNotFoundError saying where to put which file.
    """
    roots = [Path(root) for root in roots]
    if not roots:
        raise ValueError("roots must name at least one folder to search for insightface packs")
    for root in roots:
        for folder in pack_folders(root, pack):
            detector = _detector_in(folder)
            if detector is not None:
                return detector
    wanted = pack or "buffalo_l"
    searched = ", ".join(str(root) for root in roots)
    raise InsightFacePackNotFoundError(
        f"insightface model pack {'' if pack is None else repr(pack) + ' '}not found: put the pack's files in "
        f"{roots[0] / 'models' / wanted}/ (its face detector is det_10g.onnx for buffalo_l, scrfd_10g_bnkps.onnx "
        f"for antelopev2; as ComfyUI's {EXAMPLE_LAYOUT}). Searched: {searched}"
    )


def find_landmark_model(detector: str | os.PathLike[str]) -> Path | None:
    """The pack's 106-point landmark model (`2d106det.onnx`) beside its detector, or None when the pack has none."""
    folder = Path(detector).parent
    files = sorted(p for p in folder.iterdir() if p.suffix == ".onnx" and p.name.startswith(LANDMARK_PREFIX))
    return files[0] if files else None


def onnx_installed() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def pack_files(detector: str | os.PathLike[str], landmarks: bool = True) -> str:
    """The pack's files the backend reads, for the user: `buffalo_l/det_10g.onnx + 2d106det.onnx`, or a note
    when the landmark model is there but cannot be read. `landmarks=False`: the detector alone is read."""
    detector = Path(detector)
    named = f"{detector.parent.name}/{detector.name}"
    landmarks_path = find_landmark_model(detector) if landmarks else None
    if landmarks_path is None:
        return named
    if not onnx_installed():
        return f"{named}; {landmarks_path.name} not read: pip install onnx"
    return f"{named} + {landmarks_path.name}"


def input_normalisation(model_path: str | os.PathLike[str],
                        otherwise: tuple[float, float] = (127.5, 128.0)) -> tuple[float, float]:
    """(mean, std) to apply to 0-255 pixels before a pack's model: (0, 1) when its graph starts by subtracting
    and multiplying (or with a `bn_data` node), else `otherwise` (the landmark model's (127.5, 128) by default;
    insightface's recognition models take (127.5, 127.5))."""
    try:
        import onnx
    except ImportError as error:
        raise InsightFaceUnavailableError(
            f"reading the input normalisation of {Path(model_path).name} needs the onnx package: pip install onnx "
            "(the face detector works without it)"
        ) from error
    nodes = onnx.load(str(model_path), load_external_data=False).graph.node
    subtracts = multiplies = False
    for index, node in enumerate(nodes[:8]):
        subtracts |= node.name.startswith(("Sub", "_minus"))
        multiplies |= node.name.startswith(("Mul", "_mul"))
        if index < 3 and node.name == "bn_data":
            subtracts = multiplies = True
    return (0.0, 1.0) if subtracts and multiplies else otherwise


def landmark_crop_transform(box: np.ndarray, size: int) -> np.ndarray:
    """[2, 3] affine map from frame pixels to the landmark model's input: the box's centre to the middle, its
    longer side to size / LANDMARK_CROP_SCALE pixels."""
    x0, y0, x1, y1 = (float(v) for v in box)
    scale = size / (max(x1 - x0, y1 - y0) * LANDMARK_CROP_SCALE)
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[scale, 0.0, size / 2 - scale * centre_x],
                     [0.0, scale, size / 2 - scale * centre_y]], dtype=np.float64)


class LandmarkModel:
    """The 106-point landmark model of an insightface pack, run on the face boxes of a batch of frames."""

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str]) -> None:
        runtime = import_onnxruntime()
        self.path = Path(model_path)
        self.mean, self.std = input_normalisation(self.path)
        self._session: Any = runtime.InferenceSession(str(self.path), providers=list(providers))
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self.size = int(model_input.shape[2]) if isinstance(model_input.shape[2], int) else 192
        outputs = self._session.get_outputs()
        width = outputs[0].shape[1] if len(outputs) == 1 and len(outputs[0].shape) == 2 else None
        if not isinstance(width, int) or width < 2 * LANDMARK_POINTS:
            raise ValueError(f"{self.path.name} is not a 2D landmark model: expected one output of at least "
                             f"{2 * LANDMARK_POINTS} values, got {[o.shape for o in outputs]}")

    def landmarks(self, frames: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 frames and one face box each -> landmarks [N, 106, 2] in frame pixels."""
        import cv2

        if not frames:
            return np.zeros((0, LANDMARK_POINTS, 2), dtype=np.float32)
        transforms = [landmark_crop_transform(box, self.size) for box in boxes]
        crops = [cv2.warpAffine(frame, transform, (self.size, self.size), borderValue=0.0)
                 for frame, transform in zip(frames, transforms)]
        blob = ((np.stack(crops).astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        predicted = self._session.run(None, {self._input_name: np.ascontiguousarray(blob)})[0]
        # Models with more than 106 rows put the 106 points last.
        crop_points = (predicted.reshape(len(frames), -1, 2)[:, -LANDMARK_POINTS:] + 1.0) * (self.size // 2)
        points = np.empty_like(crop_points, dtype=np.float64)
        for index, transform in enumerate(transforms):
            scale, offset = transform[0, 0], transform[:, 2]
            points[index] = (crop_points[index] - offset) / scale
        return points.astype(np.float32)


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Scale an RGB frame [H, W, 3] to fit a size x size square at the top-left (zeros elsewhere); returns the
    square and the scale from frame pixels to input pixels."""
    import cv2

    height, width = frame.shape[:2]
    if height >= width:
        new_height, new_width = size, max(1, int(width * size / height))
    else:
        new_height, new_width = max(1, int(height * size / width)), size
    square = np.zeros((size, size, 3), dtype=np.uint8)
    square[:new_height, :new_width] = cv2.resize(frame, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    # The vertical scale is what the published code divides by; the horizontal one differs by under a pixel.
    return square, new_height / height


def anchor_centres(height: int, width: int, stride: int) -> np.ndarray:
    """Anchor centres of one stride level [height * width * ANCHORS_PER_CELL, 2] (x, y), row-major, each cell's
    anchors next to each other."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, ANCHORS_PER_CELL, axis=0)


def decode_scrfd(outputs: Sequence[np.ndarray], input_height: int, input_width: int,
                 threshold: float = SCORE_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The detector's 9 outputs (scores, distances to the box sides, distances to the 5 points; one of each per
    stride) -> boxes [N, 4], scores [N], points [N, 5, 2] in input pixels, for scores >= threshold."""
    if len(outputs) != 3 * len(STRIDES):
        raise ValueError(f"an SCRFD detector with 5 points has {3 * len(STRIDES)} outputs, this one has "
                         f"{len(outputs)}; use the pack's det_*.onnx / scrfd_*kps*.onnx file")
    boxes, scores, points = [], [], []
    levels = len(STRIDES)
    for level, stride in enumerate(STRIDES):
        level_scores = np.asarray(outputs[level]).reshape(-1)
        distances = np.asarray(outputs[level + levels]).reshape(-1, 4) * stride
        offsets = np.asarray(outputs[level + 2 * levels]).reshape(-1, 5, 2) * stride
        centres = anchor_centres(input_height // stride, input_width // stride, stride)
        if centres.shape[0] != level_scores.shape[0]:
            raise ValueError(f"stride {stride}: {level_scores.shape[0]} scores for {centres.shape[0]} anchors; the "
                             "detector does not match the SCRFD layout (strides 8/16/32, 2 anchors)")
        keep = level_scores >= threshold
        kept_centres = centres[keep]
        boxes.append(np.concatenate([kept_centres - distances[keep, :2], kept_centres + distances[keep, 2:]], 1))
        scores.append(level_scores[keep])
        points.append(kept_centres[:, None, :] + offsets[keep])
    return np.concatenate(boxes), np.concatenate(scores), np.concatenate(points)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Indices of the boxes kept, best first: each drops the lower-scored boxes overlapping it by IoU > threshold."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        overlap = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
        iou = overlap / np.maximum(areas[best] + areas[rest] - overlap, 1e-9)
        order = rest[iou <= threshold]
    return np.array(kept, dtype=np.int64)


class InsightFaceBackend:
    """SCRFD from an insightface pack; follows one face (the largest at the start)."""

    def __init__(self, detector_path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 input_size: int = INPUT_SIZE, landmarks: bool = True) -> None:
        runtime = import_onnxruntime()
        self.detector_path = Path(detector_path)
        if not self.detector_path.is_file():
            raise InsightFacePackNotFoundError(f"insightface detector not found: {self.detector_path}; put the "
                                               f"pack's files as in {EXAMPLE_LAYOUT}")
        available = runtime.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self._session: Any = runtime.InferenceSession(str(self.detector_path), providers=chosen)
        self._input_name = self._session.get_inputs()[0].name
        self._input_size = input_size
        self._follower = FaceFollower()
        # The 106 landmarks only feed the preview: without the onnx package the detector runs alone.
        landmark_path = find_landmark_model(self.detector_path) if landmarks and onnx_installed() else None
        self._landmarks = LandmarkModel(landmark_path, chosen) if landmark_path is not None else None
        self.description = f"insightface ({pack_files(self.detector_path, landmarks)})"

    def __enter__(self) -> InsightFaceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._follower.reset()

    def faces(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All faces of one RGB frame: boxes [N, 4], scores [N], points [N, 5, 2] in frame pixels."""
        square, scale = letterbox(frame, self._input_size)
        blob = ((square.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._session.run(None, {self._input_name: blob})
        boxes, scores, points = decode_scrfd(outputs, self._input_size, self._input_size)
        keep = non_maximum_suppression(boxes, scores)
        return boxes[keep] / scale, scores[keep], points[keep] / scale

    def detect(self, frames_uint8: np.ndarray, reset: bool = True) -> FaceTrack:
        """RGB uint8 frames [B, H, W, 3] of one video, in order -> FaceTrack (pixels)."""
        if not isinstance(frames_uint8, np.ndarray) or frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3 \
                or frames_uint8.dtype != np.uint8:
            raise ValueError("frames_uint8 must be a uint8 RGB numpy array [B, H, W, 3]")
        if reset:
            self._follower.reset()
        track = FaceTrack.empty(frames_uint8.shape[0], LANDMARK_POINTS if self._landmarks is not None else 0)
        for index, frame in enumerate(frames_uint8):
            boxes, _, points = self.faces(frame)
            chosen = self._follower.choose(list(boxes))
            if chosen is not None:
                track.points[index], track.boxes[index], track.found[index] = points[chosen], boxes[chosen], True
        if self._landmarks is not None and track.found.any():
            found = np.flatnonzero(track.found)
            track.landmarks[found] = self._landmarks.landmarks([frames_uint8[i] for i in found], track.boxes[found])
        return track
