"""Model folders of the pack in ComfyUI's ``folder_paths`` (``extra_model_paths.yaml`` entries included)."""
from __future__ import annotations

import os

import folder_paths

WEIGHTS_FOLDER = "flashportrait"  # transformer.pt, portrait_encoder.pt, pd_fpg.pth
CONDITIONING_FOLDER = "flashportrait_conditioning"  # precomputed prompt + CLIP-vision conditioning
EXPRESSIONS_FOLDER = "flashportrait_expressions"  # saved driving performances (Save / Load Expressions)


def register_model_folders() -> None:
    folders = {WEIGHTS_FOLDER: folder_paths.supported_pt_extensions,
               CONDITIONING_FOLDER: folder_paths.supported_pt_extensions,
               EXPRESSIONS_FOLDER: {".safetensors"}}
    for name, wanted in folders.items():
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            # extra_model_paths.yaml may have declared the folder first, without extensions.
            paths, extensions = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            extensions.update(wanted)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], set(wanted))


def model_file(folder: str, name: str) -> str:
    """Full path of a model file, or an error naming the folder and file expected."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder))
        raise FileNotFoundError(f"'{name}' was not found in the '{folder}' model folder ({searched}); "
                                f"put the file there or pick one from the list")
    return path
