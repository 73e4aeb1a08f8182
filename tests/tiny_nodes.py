"""Fixtures for in-process node tests on the tiny checkpoints: the model folders registered with ComfyUI,
the FlashPortrait model and the Wan VAE. Import them into a test module by name."""
from __future__ import annotations

import pytest

from flashportrait_core.weights.checkpoints import load_state_dict
from pack import import_pack

pack = import_pack()
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folders(tiny_models_dir):
    for folder in ("diffusion_models", "vae", "flashportrait", "flashportrait_conditioning"):
        folder_paths.add_model_folder_path(folder, str(tiny_models_dir / folder))
    pack.nodes.register_model_folders()
    return tiny_models_dir


@pytest.fixture(scope="module")
def tiny_model(tiny_folders):
    return pack.nodes.loaders.FlashPortraitModelLoader.execute("wan2.1_i2v_tiny.safetensors", "transformer_tiny.pt",
                                                               "default").result[0]


@pytest.fixture(scope="module")
def tiny_vae(tiny_models_dir):
    return comfy.sd.VAE(sd=load_state_dict(tiny_models_dir / "vae" / "wan_2.1_vae_tiny.safetensors"))
