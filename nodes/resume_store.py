"""Resume checkpoints of the guider's sampling runs, written as often as the user chose.

A checkpoint holds the latents at the start of a step (and, per window, the blend of the windows done so far in
that step), every window's ALP state and the guider's counters. Euler is stateless beyond the latents, so a run
restarted from a checkpoint gives the latents of a run that never stopped; other samplers keep a history inside
ComfyUI's sampler that cannot be restored, so they write no checkpoints.

Files live in ``<output>/flashportrait_resume`` (ComfyUI empties its temp folder at every start). Their names carry
the job (the reference image and the driving features) and a hash of every setting that decides the result: a
run of the same job with other settings deletes the job's older checkpoints, which could never be resumed by it;
other jobs' files are never touched. A finished run deletes its own.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.samplers
import folder_paths
import torch

from ..flashportrait_core.sampling.resume import (SamplingCheckpoint, load_checkpoint, remove_checkpoint,
                                                  restore_window_state, resume_key, save_checkpoint,
                                                  window_state_dict)

log = logging.getLogger(__name__)

RESUME_SUBFOLDER = "flashportrait_resume"
OFF = "off"
EVERY_WINDOW = "every window"
#: The choices of the ``resume`` widgets: how often a checkpoint is written.
CHOICES = (OFF, "every step", "every 2 steps", "every 5 steps", "every 10 steps", EVERY_WINDOW)


def is_euler(sampler) -> bool:
    """Whether a SAMPLER is ComfyUI's plain Euler (ALP and exact resume need it)."""
    return getattr(sampler, "sampler_function", None) is k_diffusion_sampling.sample_euler


def resume_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), RESUME_SUBFOLDER)


@dataclass(frozen=True)
class ResumePolicy:
    """How often a run writes a checkpoint: never, every ``every_steps`` steps, or after every window."""

    every_steps: int = 0  # 0: not at step starts
    per_window: bool = False

    @classmethod
    def from_choice(cls, choice: str) -> "ResumePolicy":
        if choice not in CHOICES:
            raise ValueError(f"resume must be one of {CHOICES}, got {choice!r}")
        if choice == OFF:
            return cls()
        if choice == EVERY_WINDOW:
            return cls(per_window=True)
        words = choice.split()
        return cls(every_steps=1 if words[1] == "step" else int(words[1]))

    @property
    def enabled(self) -> bool:
        return self.per_window or self.every_steps > 0

    def describe(self) -> str:
        if self.per_window:
            return "after every window"
        return "every step" if self.every_steps == 1 else f"every {self.every_steps} steps"


def model_fingerprint(model_patcher) -> list:
    """A cheap identity of the weights for the resume key: the model class, a strided sample of a few of its
    tensors, and the keys and strengths of applied patches (LoRAs)."""
    state = model_patcher.model.diffusion_model.state_dict()
    names = sorted(state)
    sampled = [(name, state[name].detach().flatten()[:: max(1, state[name].numel() // 256)].float().cpu())
               for name in names[:: max(1, len(names) // 8)]]
    patches = [(key, [(float(p[0]), float(p[2])) for p in patch_list])
               for key, patch_list in sorted(model_patcher.patches.items())]
    return [type(model_patcher.model).__name__, len(names), sampled, patches]


def _conds_fingerprint(conds: list) -> list:
    """What a CONDITIONING's entries contribute to the result: prompts, CLIP output, timestep ranges, strength."""
    out = []
    for entry in conds:
        clip = entry.get("clip_vision_output")
        out.append([entry.get("cross_attn"), getattr(clip, "penultimate_hidden_states", None),
                    entry.get("start_percent"), entry.get("end_percent"), entry.get("strength")])
    return out


def _megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 1e6


class ResumeSession:
    """The checkpoints of one sampling call: what was resumed, when to write, and clean-up."""

    def __init__(self, guider=None, path: Path | None = None, key: str = "", policy: ResumePolicy | None = None):
        self.guider, self.path, self.key = guider, path, key
        self.policy = policy or ResumePolicy()
        self.start_step = 0
        self.latents: torch.Tensor | None = None
        self.windows_done = 0
        self.partial: torch.Tensor | None = None
        self.notes: list[str] = []
        self._announced = False

    @classmethod
    def open(cls, guider, noise: torch.Tensor, latent_image: torch.Tensor, sampler, sigmas: torch.Tensor,
             seed: int | None) -> "ResumeSession":
        policy = guider.resume
        if not policy.enabled:
            return cls()
        if not is_euler(sampler):
            session = cls()
            session.notes.append("resume: no checkpoints written (only the euler sampler can be resumed exactly; "
                                 "other samplers keep a history inside ComfyUI's sampler)")
            return session
        plan, emotion = guider._plan, guider.emotion
        job = resume_key(reference=guider.reference_image, emotion=emotion.resume_fingerprint())
        settings = dict(seed=seed, noise=noise, sigmas=sigmas, size=tuple(latent_image.shape),
                        start=latent_image if bool(torch.count_nonzero(latent_image)) else None,
                        windows=plan.windows, emotion=emotion, passes=guider.passes,
                        positive=_conds_fingerprint(guider.original_conds.get("positive", [])),
                        negative=_conds_fingerprint(guider.original_conds.get("negative", [])),
                        alp=guider.alp, model=model_fingerprint(guider.model_patcher))
        key = resume_key(**settings)
        folder = Path(resume_folder())
        session = cls(guider, folder / f"flashportrait_resume_{job[:16]}_{key}.pt", key, policy)
        session._remove_stale(folder, job[:16])
        session._load()
        return session

    def _remove_stale(self, folder: Path, job: str) -> None:
        """Delete this job's checkpoints written with other settings (they can never resume this run)."""
        stale = [p for p in folder.glob(f"flashportrait_resume_{job}_*.pt") if p != self.path] \
            if folder.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            self.notes.append(f"resume: removed {len(stale)} checkpoint(s) of this job made with other settings")

    def _load(self) -> None:
        saved = load_checkpoint(self.path, self.key)
        guider = self.guider
        steps = len(guider._sigmas) - 1
        if saved is None:
            return
        if len(saved.window_states) != len(guider._states) or not 0 < saved.completed_steps < steps:
            log.warning("ignoring resume checkpoint %s: it does not fit this run", self.path)
            return
        self.start_step, self.latents = saved.completed_steps, saved.latents
        for state, saved_state in zip(guider._states, saved.window_states):
            restore_window_state(state, saved_state)
        guider.restore_checkpoint_state(saved.extra)
        self.windows_done = int(saved.extra.get("windows_done", 0))
        self.partial = saved.extra.get("partial")
        where = f"step {self.start_step}" + (f", window {self.windows_done}" if self.windows_done else "")
        guider.report.resumed_from = where

    def resumed_sampler(self, sampler, callback):
        """The sampler (and callback) that continue from the loaded checkpoint; unchanged when none was loaded."""
        if self.latents is None:
            return sampler, callback
        start, latents, run = self.start_step, self.latents, sampler.sampler_function

        def resume_run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
            shifted = None if callback is None else (lambda info: callback({**info, "i": info["i"] + start}))
            return run(model, latents.to(device=x.device, dtype=x.dtype), sigmas[start:], extra_args=extra_args,
                       callback=shifted, disable=disable, **options)

        return comfy.samplers.KSAMPLER(resume_run, sampler.extra_options, sampler.inpaint_options), callback

    def before_step(self, step: int, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """At the start of a step: the windows already blended (when resuming inside this step); writes the step's
        checkpoint when the policy asks for one."""
        if self.partial is not None and step == self.start_step:
            first, partial = self.windows_done, self.partial.to(device=x.device, dtype=torch.float32)
            self.partial, self.windows_done = None, 0
            return first, partial
        every = self.policy.every_steps
        if self.path is not None and every and step > self.start_step and step % every == 0:
            self._write(step, x)
        return 0, None

    def after_window(self, step: int, window: int, x: torch.Tensor, partial: torch.Tensor) -> None:
        if self.path is not None and self.policy.per_window and window + 1 < len(self.guider._plan.windows):
            self._write(step, x, window + 1, partial)

    def _write(self, step: int, x: torch.Tensor, windows_done: int = 0, partial: torch.Tensor | None = None) -> None:
        guider = self.guider
        extra = guider.checkpoint_state()
        if windows_done:
            extra.update(windows_done=windows_done, partial=partial.detach().cpu())
        states = [window_state_dict(s) for s in guider._states]
        save_checkpoint(self.path, self.key, SamplingCheckpoint(step, x, states, extra))
        if not self._announced:
            self._announced = True
            tensors = [x] + ([partial] if partial is not None else [])
            for state in states:
                tensors += state["history_velocities"] + [state["latent_at_compute"]]
            self.notes.append(f"resume: a checkpoint {self.policy.describe()}, {_megabytes(tensors):.1f} MB each, "
                              f"in {self.path.parent}")

    def finish(self) -> None:
        """The run completed: its checkpoint is of no further use."""
        if self.path is not None:
            remove_checkpoint(self.path)
            if not self._announced and self.policy.enabled:
                self.notes.append(f"resume: checkpoints {self.policy.describe()} (none was due in this run)")

