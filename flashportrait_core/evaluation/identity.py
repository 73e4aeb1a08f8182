"""Identity similarity with the face-recognition model of a user's insightface pack, run by onnxruntime.

insightface's packs carry an ArcFace recognition model: `w600k_r50.onnx` in buffalo_l (and buffalo_m),
`glintr100.onnx` in antelopev2, `w600k_mbf.onnx` in the small packs. As insightface runs them: the face is aligned
by a similarity transform of its 5 points (eye centres, nose tip, mouth corners) onto the ArcFace template in a
112x112 crop, bilinear, black outside the frame, kept as 8-bit RGB; the pixels go in as (x - 127.5) / 127.5
unless the model's graph normalises its input itself; the output is one embedding per face (512 values), and two
faces are compared by the cosine of their embeddings (1 = the same embedding).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kornia.geometry.transform import warp_affine

from ..expression.alignment import cut_warp_regions, umeyama_similarity
from ..expression.insightface_backend import import_onnxruntime, input_normalisation, onnx_installed, pack_folders

CROP_SIZE = 112
# ArcFace's 5-point template in a 112x112 crop: left eye, right eye, nose tip, left and right mouth corner.
TEMPLATE = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))
# Recognition models by pack, in the order they are preferred (the larger model first).
RECOGNITION_FILES = ("glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")
UNNORMALISED_INPUT = (127.5, 127.5)


class RecognitionModelNotFoundError(FileNotFoundError):
    """No insightface recognition model in the searched folders."""


def missing_model_message(roots: Sequence[str | os.PathLike[str]]) -> str:
    first = Path(roots[0]) if roots else Path("models/insightface")
    return (f"no face-recognition model found: add w600k_r50.onnx (from insightface's buffalo_l pack) to "
            f"{first / 'models' / 'buffalo_l'}/ or glintr100.onnx (antelopev2) to {first / 'models' / 'antelopev2'}/; "
            f"searched {', '.join(str(r) for r in roots) or 'nothing'}")


def recognition_models(roots: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Every recognition model under the insightface `roots`, preferred first (antelopev2, buffalo_l, ...)."""
    found: list[Path] = []
    for root in roots:
        for folder in pack_folders(Path(root), None):
            for name in RECOGNITION_FILES:
                path = folder / name
                if path.is_file() and path.resolve() not in {p.resolve() for p in found}:
                    found.append(path)
    return found


def model_label(path: str | os.PathLike[str]) -> str:
    """`buffalo_l/w600k_r50.onnx`: how a choice is shown to the user."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def find_recognition_model(roots: Sequence[str | os.PathLike[str]], label: str = "auto") -> Path:
    """The recognition model named `label` (as `model_label` gives it), or the preferred one for "auto"."""
    models = recognition_models(roots)
    if label != "auto":
        models = [path for path in models if model_label(path) == label]
    if not models:
        message = missing_model_message(roots)
        raise RecognitionModelNotFoundError(message if label == "auto" else f"{label} is gone; {message}")
    return models[0]


def arcface_transforms(points: torch.Tensor) -> torch.Tensor:
    """Face points [B, 5, 2] in frame pixels -> [B, 2, 3] similarity maps from frame pixels to the 112 crop."""
    template = torch.tensor(TEMPLATE, dtype=torch.float64)
    return umeyama_similarity(points.to(torch.float64), template)


def arcface_crops(frames: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Aligned 8-bit crops [B, 3, 112, 112] (float, values 0..255 RGB) of frames [B, H, W, 3] (uint8, or float in
    [0, 1]) at their face points [B, 5, 2]."""
    transforms = arcface_transforms(points).to(torch.float32)
    regions, shifted = cut_warp_regions(frames, transforms, CROP_SIZE)
    pixels = regions.float() if regions.dtype == torch.uint8 else (regions.float() * 255.0).round_()
    warped = warp_affine(pixels.permute(0, 3, 1, 2), shifted, (CROP_SIZE, CROP_SIZE), mode="bilinear",
                         padding_mode="zeros", align_corners=True)
    return warped.round_().clamp_(0.0, 255.0)


class RecognitionModel:
    """An insightface ArcFace model: aligned crops -> L2-normalised embeddings."""

    def __init__(self, model_path: str | os.PathLike[str], providers: Sequence[str] | None = None) -> None:
        runtime = import_onnxruntime()
        self.path = Path(model_path)
        available = runtime.get_available_providers()
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        self._session: Any = runtime.InferenceSession(str(self.path), providers=chosen)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        shape = list(model_input.shape)
        if len(shape) != 4 or shape[1] != 3 or shape[2:] != [CROP_SIZE, CROP_SIZE]:
            raise ValueError(f"{self.path.name} is not an ArcFace recognition model: its input is {shape}, expected "
                             f"[N, 3, {CROP_SIZE}, {CROP_SIZE}]; use the pack's w600k_r50.onnx or glintr100.onnx")
        self._one_at_a_time = isinstance(shape[0], int)  # a fixed batch dimension (of 1)
        outputs = self._session.get_outputs()
        if len(outputs[0].shape) != 2:
            raise ValueError(f"{self.path.name} is not an ArcFace recognition model: its output is "
                             f"{outputs[0].shape}, expected [N, embedding size]")
        # Without the onnx package the graph cannot be read; the published recognition models expect
        # (x - 127.5) / 127.5 from the caller.
        self.mean, self.std = input_normalisation(self.path, UNNORMALISED_INPUT) if onnx_installed() \
            else UNNORMALISED_INPUT
        self.description = model_label(self.path)

    def embed(self, crops: torch.Tensor) -> np.ndarray:
        """Crops [B, 3, 112, 112] (0..255 RGB) -> embeddings [B, D], each of length 1."""
        if crops.shape[0] == 0:
            return np.zeros((0, 0), dtype=np.float32)
        blob = ((crops.float() - self.mean) / self.std).numpy()
        if self._one_at_a_time:
            parts = [self._session.run(None, {self._input_name: blob[i:i + 1]})[0] for i in range(blob.shape[0])]
            embeddings = np.concatenate(parts)
        else:
            embeddings = self._session.run(None, {self._input_name: np.ascontiguousarray(blob)})[0]
        embeddings = embeddings.astype(np.float64)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def cosine_similarity(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each embedding [B, D] with one reference [D] (all of length 1): [B]."""
    return np.clip(embeddings.astype(np.float64) @ reference.astype(np.float64), -1.0, 1.0)
