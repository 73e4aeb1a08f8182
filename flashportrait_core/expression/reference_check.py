"""Does the reference portrait show a face the detector finds? FlashPortrait animates faces only.

A miss is reported, not refused: detectors trained on photographs miss some painted or stylised faces that the
model still animates, so the user decides.
"""
from __future__ import annotations

import numpy as np
import torch

from .backends import FaceBackendChoice


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """First image of a ComfyUI IMAGE batch [N, H, W, C] (floats in [0, 1], C = 3 or 4) as RGB uint8 [H, W, 3]."""
    return (image[0, :, :, :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def reference_shows_face(image: torch.Tensor, choice: FaceBackendChoice) -> bool:
    """True when the face backend finds a face in the first image of ``image``."""
    with choice.create() as backend:
        track = backend.detect(np.ascontiguousarray(image_to_uint8(image))[None])
    return bool(track.found[0])


def reference_face_note(image: torch.Tensor, choice: FaceBackendChoice) -> str | None:
    """A line for the sampler's report when no face is found in the reference, else None."""
    if reference_shows_face(image, choice):
        return None
    return (f"no face found in reference_image by {choice.name}: FlashPortrait animates a face, so the video "
            f"will not follow the driving expressions unless the model sees one; use a portrait with the face "
            f"clearly visible (a stylised face the detector misses may still work)")
