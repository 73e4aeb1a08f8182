"""Real performances for the edit and evaluation tests, extracted once per test process.

Real driving videos and portraits from ../shared/data through MediaPipe and the real-size PD-FGC encoder (random
weights: no trained file can be had here); a handful of frames each, since the encoder is slow on this CPU.
Cached: tests must not modify what these return (the edits never do).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flashportrait_core.expression import (ExpressionFeatures, extract_expression_features,
                                           extract_expression_features_from_video, load_fan_encoder,
                                           random_fan_encoder_state_dict, read_video_frames)
from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DRIVING = DATA / "driving"
REFERENCE = DATA / "reference"
DRIVING_FRAMES = 8  # of lp_d0.mp4 (25 fps, strong expressions)
TALKING_FRAMES = 6  # of lp_d10.mp4 (30 fps, talking)
SMOOTHING = 0.5


@lru_cache(maxsize=1)
def encoder():
    return load_fan_encoder(random_fan_encoder_state_dict(seed=0))


@lru_cache(maxsize=1)
def driving() -> ExpressionFeatures:
    """The first DRIVING_FRAMES frames of lp_d0.mp4, extracted from the file at its own 25 fps."""
    with MediaPipeFaceBackend() as backend:
        return extract_expression_features_from_video(DRIVING / "lp_d0.mp4", encoder(), backend, batch_size=8,
                                                      smoothing=SMOOTHING, max_frames=DRIVING_FRAMES)


def driving_frames() -> torch.Tensor:
    """The frames `driving()` was extracted from, as an IMAGE batch."""
    return read_video_frames(DRIVING / "lp_d0.mp4", max_frames=DRIVING_FRAMES)[0]


@lru_cache(maxsize=1)
def talking() -> ExpressionFeatures:
    """The first TALKING_FRAMES frames of lp_d10.mp4, at its own 30 fps."""
    with MediaPipeFaceBackend() as backend:
        return extract_expression_features_from_video(DRIVING / "lp_d10.mp4", encoder(), backend, batch_size=8,
                                                      smoothing=SMOOTHING, max_frames=TALKING_FRAMES)


def portrait(name: str = "fp_case1.png") -> np.ndarray:
    """A reference portrait as RGB uint8 [H, W, 3]."""
    return np.array(Image.open(REFERENCE / name).convert("RGB"))


def portrait_image(name: str = "fp_case1.png") -> torch.Tensor:
    """A reference portrait as a ComfyUI IMAGE batch [1, H, W, 3] in [0, 1]."""
    return torch.from_numpy(portrait(name)).float().div(255.0)[None]


@lru_cache(maxsize=4)
def reference_features(name: str = "fp_case1.png") -> torch.Tensor:
    """The portrait's own expression features [554], with the same extractor as `driving()`."""
    with MediaPipeFaceBackend() as backend:
        return extract_expression_features(portrait_image(name), encoder(), backend, batch_size=1).features[0]
