"""The reference-portrait face check on real portraits and on images without a face."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashportrait_core.expression.backends import resolve_face_backend
from flashportrait_core.expression.reference_check import image_to_uint8, reference_face_note

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reference"


def _image(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).float()[None] / 255.0


@pytest.fixture(scope="module")
def mediapipe():
    return resolve_face_backend("mediapipe")


@pytest.mark.parametrize("name", ["fp_case1.png", "lp_s0.jpg", "lp_s5.jpg"])
def test_real_portraits_pass_without_a_note(mediapipe, name):
    assert reference_face_note(_image(REFERENCE_DIR / name), mediapipe) is None


@pytest.mark.parametrize("image", [torch.full((1, 256, 256, 3), 0.5), torch.rand(1, 200, 300, 4,
                                                                                 generator=torch.Generator().manual_seed(0))])
def test_images_without_a_face_get_a_note_naming_the_input(mediapipe, image):
    note = reference_face_note(image, mediapipe)
    assert note is not None and note.startswith("no face found in reference_image by mediapipe")


def test_image_conversion_drops_alpha_and_rounds():
    image = torch.tensor([[[[0.0, 0.5, 1.0, 0.25], [1.2, -0.1, 0.999, 1.0]]]])
    assert image_to_uint8(image).tolist() == [[[0, 128, 255], [255, 0, 255]]]
