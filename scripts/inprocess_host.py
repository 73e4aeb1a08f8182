"""Make ComfyUI's ``comfy`` package importable inside this process (tests, model generation)."""
from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def use_host_in_process() -> Path:
    """Put the provisioned (or ``COMFYUI_PATH``) ComfyUI on ``sys.path``; pick the CPU where CUDA is absent.

    ``comfy.model_management`` chooses its device at import time from the command-line options, which a
    process other than the server never parsed; without a GPU it must be told to use the CPU first.
    """
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import host

    path = host.comfyui_path()
    if not (path / "comfy").is_dir():
        host.provision()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    return path
