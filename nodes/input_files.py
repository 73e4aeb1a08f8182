"""File inputs typed by a user (a driving video, an audio source) resolved inside ComfyUI's folders.

A server started with ``--listen`` takes prompts from anyone who reaches it, so a file input must not read
whatever path it is given. Names are resolved as ComfyUI resolves its own file inputs
(``folder_paths.get_annotated_filepath``): relative to the input folder, or to the output/temp folder with a
trailing `` [output]`` / `` [temp]`` (`` [input]`` names the input folder explicitly). Absolute paths and
``..`` that lead out of that folder are refused, unless the server was started with
``FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS=1``: a variable of the server's environment, not a front-end setting,
because front-end settings can be changed by every browser that reaches the server.
"""
from __future__ import annotations

import os

import folder_paths

ALLOW_OUTSIDE_PATHS_VARIABLE = "FLASHPORTRAIT_ALLOW_OUTSIDE_PATHS"
_TRUE = {"1", "true", "yes", "on"}
NAME_MAX = 255  # bytes of one path component on the common file systems


class InputFileError(ValueError):
    """A file input names no readable file inside ComfyUI's folders; the message says which input and why."""


def outside_paths_allowed() -> bool:
    return os.environ.get(ALLOW_OUTSIDE_PATHS_VARIABLE, "").strip().lower() in _TRUE


def _folder_label(name: str) -> str:
    if name.endswith("[output]"):
        return "output"
    if name.endswith("[temp]"):
        return "temp"
    return "input"


def _inside(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def resolve_input_file(typed: str, input_name: str) -> str:
    """The absolute path of the file an input names, or InputFileError naming the input, the folder and the fix.

    ``typed`` may be quoted (as copied from a file manager) and annotated (``clip.mp4 [input]``).
    """
    name = (typed or "").strip().strip('"').strip("'").strip()
    label = _folder_label(name)
    relative, base = folder_paths.annotated_filepath(name)
    folder = os.path.abspath(base or folder_paths.get_input_directory())
    relative = relative.strip()
    if not relative:
        raise InputFileError(f"{input_name} is empty: give the name of a file in ComfyUI's {label} folder "
                             f"({folder})")
    if any(len(part.encode()) > NAME_MAX for part in relative.replace("\\", "/").split("/")):
        raise InputFileError(f"{input_name} '{relative[:60]}...' has a file name longer than {NAME_MAX} bytes, "
                             f"which no file can have; give the name of a file in ComfyUI's {label} folder")
    path = os.path.abspath(os.path.join(folder, os.path.expanduser(relative)))
    if not _inside(folder, path) and not outside_paths_allowed():
        raise InputFileError(
            f"{input_name} '{typed.strip()}' is outside ComfyUI's {label} folder ({folder}); put the file in that "
            f"folder (subfolders are fine) and give its name relative to it, e.g. 'clips/talk.mp4', or "
            f"'talk.mp4 [output]' for a file in the output folder. To read files anywhere, start the server "
            f"with {ALLOW_OUTSIDE_PATHS_VARIABLE}=1 in its environment")
    if os.path.isdir(path):
        raise InputFileError(f"{input_name} '{relative}' is a folder ({path}), not a file; give the name of a "
                             f"video or audio file in it, e.g. '{os.path.join(relative, 'talk.mp4')}'")
    if not os.path.isfile(path):
        where = f"in ComfyUI's {label} folder " if _inside(folder, path) else ""
        raise InputFileError(f"{input_name} '{relative}' was not found {where}(looked for {path}); put the file "
                             f"there or correct the name")
    return path
