"""Shared fixtures: the repository on sys.path, tiny models, and one real ComfyUI server per session.

Graph tests (marked ``graph``) talk to ``comfy_server``: ComfyUI 0.3.75 started on loopback with the
pack linked into its custom_nodes, the tiny models from ``scripts/make_tiny_models.py`` as its models
folder, and fresh input/output folders. ``COMFYUI_PATH`` selects an existing ComfyUI instead of
``<repo>/.host/ComfyUI``.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `import flashportrait_core`, `import scripts.comfy_client`

from scripts import comfy_client, host  # noqa: E402

TINY_MODELS_DIR = REPO_ROOT / ".models" / "tiny"
TINY_MODELS_SCRIPT = REPO_ROOT / "scripts" / "make_tiny_models.py"
TINY_MODELS_STAMP = ".generated-by.sha256"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "graph: runs workflows through a real ComfyUI server (slow start)")


def _generator_digest() -> str:
    """Hash of everything the tiny models depend on: the generator and the core package it imports."""
    digest = hashlib.sha256()
    sources = [TINY_MODELS_SCRIPT, *sorted((REPO_ROOT / "flashportrait_core").rglob("*.py"))]
    for path in sources:
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI folder, provisioned (or taken from COMFYUI_PATH), with the pack linked in."""
    try:
        return host.provision(log=lambda message: print(message, file=sys.stderr))
    except host.HostError as error:
        pytest.fail(f"ComfyUI host unavailable: {error}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """``<repo>/.models/tiny``, written by scripts/make_tiny_models.py once (again when its sources change)."""
    if not TINY_MODELS_SCRIPT.is_file():
        pytest.fail(f"{TINY_MODELS_SCRIPT} is missing; graph tests need its tiny models", pytrace=False)
    with host._locked(REPO_ROOT / ".models" / ".tiny.lock"):
        stamp = TINY_MODELS_DIR / TINY_MODELS_STAMP
        wanted = _generator_digest()
        if stamp.is_file() and stamp.read_text().strip() == wanted:
            return TINY_MODELS_DIR
        result = subprocess.run([sys.executable, str(TINY_MODELS_SCRIPT), "--out", str(TINY_MODELS_DIR)],
                                cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"{TINY_MODELS_SCRIPT.name} failed ({result.returncode}):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}", pytrace=False)
        stamp.write_text(wanted + "\n")
    return TINY_MODELS_DIR


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir: Path, tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A running ComfyUI server (``.url``, ``.input_dir``, ``.output_dir``, ``.log_path``), stopped at the end."""
    session_dir = tmp_path_factory.mktemp("comfyui")
    try:
        # Latent previews on, as users run ComfyUI (their websocket messages are tested).
        server = host.start_server(tiny_models_dir, session_dir / "input", session_dir / "output",
                                   session_dir / "temp", comfyui_dir=comfyui_dir,
                                   extra_args=["--preview-method", "latent2rgb"])
    except host.HostError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_object_info(comfy_server) -> dict:
    """The server's ``/object_info`` (every node definition), fetched once."""
    return comfy_client.object_info(comfy_server.url)


@pytest.fixture()
def hide_module(monkeypatch: pytest.MonkeyPatch):
    """``hide_module(name)`` makes ``import name`` (and its submodules) fail as if the package were not installed,
    for the rest of the test."""
    import builtins

    hidden: set[str] = set()
    real_import = builtins.__import__

    def guarded_import(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    return hidden.add
