"""Checkpoints of an unfinished sampling run, so that an interrupted long job continues where it stopped.

A checkpoint holds everything a windowed Euler run carries from one denoising step to the next: the latents after
k completed steps and, with Adaptive Latent Prediction, every window's forecast history (``ALPWindowState``), plus
whatever else the caller remembers (``extra``: counters, a step's partial blend). Every later step is a
deterministic function of exactly that state, so restoring it and continuing from step k gives the bit-identical
result of a run that never stopped.

The file is a torch zip archive of tensors and plain Python values only, so it loads with
``weights_only=True``. It is written under a temporary name and renamed over the final one (atomic on POSIX
and Windows), so a crash while writing leaves the previous checkpoint intact. Its name is a hash of
everything that determines the result (``resume_key``): another seed, schedule, size, window plan,
conditioning, ALP setting or model gets its own file and never resumes from someone else's state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .alp import ALPWindowState

FORMAT = "flashportrait-resume/2"
log = logging.getLogger(__name__)


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    """Feed a value into the hash, type-tagged so that e.g. 1 and "1" or [1, 2] and [[1], 2] differ."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # raw bytes; no copy for CPU tensors
    elif callable(getattr(value, "resume_fingerprint", None)):  # e.g. a module-backed source: hash what it names
        digest.update(f"fingerprint {type(value).__name__}|".encode())
        _feed(digest, value.resume_fingerprint())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"dataclass {type(value).__name__}|".encode())
        _feed(digest, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}|".encode())
        for name in sorted(value, key=str):
            _feed(digest, str(name))
            _feed(digest, value[name])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq {len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r}|".encode())


def resume_key(**parts: Any) -> str:
    """A hex name for a run from everything that determines its result (tensors hashed by their bytes)."""
    digest = hashlib.blake2b(FORMAT.encode(), digest_size=16)
    _feed(digest, parts)
    return digest.hexdigest()


def checkpoint_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"flashportrait_resume_{key}.pt"


@dataclass
class SamplingCheckpoint:
    """The state of a window loop after ``completed_steps`` steps."""

    completed_steps: int
    latents: torch.Tensor
    window_states: list[dict] = field(default_factory=list)  # window_state_dict of each ALP window
    extra: dict = field(default_factory=dict)  # the caller's own tensors and plain values


# ALPWindowState fields that change while sampling; sigmas, config and budget follow from the settings.
_STATE_FIELDS = ("history_sigmas", "history_velocities", "latent_at_compute", "sigma_at_compute", "error_estimate",
                 "top_term_scale", "order_cap", "computed_steps", "skipped_steps", "layer_ratios")


def window_state_dict(state: ALPWindowState) -> dict:
    """The evolving part of one window's ALP state, on the CPU, as plain values and tensors."""
    saved = {name: getattr(state, name) for name in _STATE_FIELDS}
    saved["history_velocities"] = [v.detach().cpu() for v in state.history_velocities]
    if state.latent_at_compute is not None:
        saved["latent_at_compute"] = state.latent_at_compute.detach().cpu()
    for name in ("history_sigmas", "computed_steps", "skipped_steps", "layer_ratios"):
        saved[name] = list(saved[name])
    return saved


def restore_window_state(state: ALPWindowState, saved: dict, device: torch.device | str | None = None) -> None:
    """Put a saved window state into a fresh one made with the same sigmas and config (in place)."""
    for name in _STATE_FIELDS:
        if name not in saved:
            raise ValueError(f"the checkpoint's window state lacks {name!r}; it was written by another version")
        setattr(state, name, saved[name])
    state.history_velocities = list(state.history_velocities)
    for name in ("history_sigmas", "computed_steps", "skipped_steps", "layer_ratios"):
        setattr(state, name, list(getattr(state, name)))
    if device is not None:
        move_window_state(state, device)


def move_window_state(state: ALPWindowState, device: torch.device | str) -> None:
    """Move one window's ALP tensors to ``device`` (exact copies): off the compute device between visits."""
    state.history_velocities = [v.to(device) for v in state.history_velocities]
    if state.latent_at_compute is not None:
        state.latent_at_compute = state.latent_at_compute.to(device)


def save_checkpoint(path: str | Path, key: str, checkpoint: SamplingCheckpoint) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "key": key, "completed_steps": int(checkpoint.completed_steps),
               "latents": checkpoint.latents.detach().cpu(), "window_states": checkpoint.window_states,
               "extra": checkpoint.extra}
    temporary = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load_checkpoint(path: str | Path, key: str) -> SamplingCheckpoint | None:
    """The checkpoint at ``path`` if it exists and belongs to ``key``; None (and a log line) otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file must not block a fresh run
        log.warning("ignoring unreadable resume checkpoint %s: %s", path, error)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != key:
        log.warning("ignoring resume checkpoint %s: written for another run or version", path)
        return None
    return SamplingCheckpoint(completed_steps=int(payload["completed_steps"]), latents=payload["latents"],
                              window_states=list(payload["window_states"]), extra=dict(payload["extra"]))


def remove_checkpoint(path: str | Path) -> None:
    """Delete a finished run's checkpoint, and its folder when that is left empty."""
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # other runs' checkpoints (or other files) are still there
