"""The FlashPortrait Sampler node: the published windowed sampling in one node, over ComfyUI's own sampling."""
from __future__ import annotations

import logging

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.backends import FaceBackendChoice, FaceBackendUnavailableError
from ..flashportrait_core.expression.reference_check import reference_face_note
from ..flashportrait_core.sampling.choice import (ACCELERATIONS, EULER, FOUR_STEP_LORA, MAX_TARGET_SPEEDUP,
                                                  check_sampling_widgets, resolve_sampling)
from ..flashportrait_core.sampling.schedules import PUBLISHED, SIMPLE
from ..flashportrait_core.validation import size_note, window_note
from . import resume_store, types
from .devices import devices_input
from .guider import build_guider, empty_video_latent, needs_comfy_cfg, progress_reporter
from .loaders import resolve_backend
from .report_ui import sampler_ui
from .widget_checks import widget_problem

SCHEDULE_TOOLTIP = ("Noise levels of the steps. published: the published inference's grid (diffusers' flow-matching "
                    "Euler scheduler; last model calls at 0.17 and 0.024 for 30 steps). simple: ComfyUI's simple "
                    "scheduler on the same shift (last calls 0.26 and 0.15, higher).")
ACCELERATION_TOOLTIP = ("off: every step computed, as published. quality / balanced / fast: Adaptive Latent "
                        "Prediction (this pack's reconstruction of the paper's method, not the authors' code), "
                        "about 3x / 4x / 6x fewer DiT passes by forecasting each window's trajectory (needs the "
                        "euler sampler). '4-step LoRA': the published fast path, 4 Euler steps at timesteps "
                        "1000/750/500/250 (steps and schedule are not used); apply the distillation LoRA first "
                        "(LoraLoaderModelOnly).")
TARGET_TOOLTIP = ("Optional, with an ALP preset only: a target speed-up (e.g. 5 = a fifth of the DiT passes) "
                  "instead of the preset's; 0 uses the preset.")
RESUME_TOOLTIP = ("Checkpoints of an unfinished run in output/flashportrait_resume, so a run interrupted (or "
                  "crashed) continues where it stopped when queued again with the same settings. Each checkpoint "
                  "holds the whole video's latents (the report shows the size); 'every window' also the step's "
                  "blend so far. Needs the euler sampler. A finished run deletes its checkpoints.")
SAMPLER_TOOLTIP = ("Step update. euler: the published one. The others are ComfyUI's own samplers (as in "
                   "KSamplerSelect): a different sample from the published one. ALP, the 4-step LoRA path and "
                   "resume checkpoints need euler.")


def available_face_backend() -> FaceBackendChoice | None:
    """The face backend `auto` would pick, or None where none is installed (the reference is then not checked)."""
    try:
        return resolve_backend("auto")
    except FaceBackendUnavailableError:
        return None


def sampler_choices() -> list[str]:
    """The sampler widget's options: euler first (the default, the published update), then ComfyUI's others that
    the guider can run (not the CFG++ ones: see ``guider.needs_comfy_cfg``)."""
    return [EULER, *(name for name in comfy.samplers.KSampler.SAMPLERS
                     if name != EULER and not needs_comfy_cfg(name))]


def step_sampler(name: str) -> comfy.samplers.KSAMPLER:
    """The SAMPLER KSamplerSelect gives for ``name``, labelled with that name for the report (``ddim`` and
    ``uni_pc`` would otherwise read as the k-diffusion function they run)."""
    sampler = comfy.samplers.sampler_object(name)
    sampler.label = name
    return sampler


def guider_inputs() -> list:
    """The inputs the sampler node shares with FlashPortrait Guider."""
    return [
        io.Model.Input("model", tooltip="From FlashPortrait Model Loader (LoRAs may be applied)."),
        io.Conditioning.Input("positive", tooltip="Encoded prompt (umT5, CLIP Text Encode); combined and "
                                                  "timestep-ranged conditioning work."),
        io.Conditioning.Input("negative", tooltip="Encoded negative prompt; used when text_cfg > 1."),
        io.ClipVisionOutput.Input("clip_vision_output",
                                  tooltip="CLIP Vision Encode of the reference image (clip_vision_h)."),
        io.Vae.Input("vae", tooltip="Wan 2.1 VAE, used to encode the reference image."),
        io.Image.Input("reference_image", tooltip="The portrait to animate (first image is used)."),
        types.EmotionConditioning.Input("emotion", tooltip="From FlashPortrait Emotion Conditioning."),
        types.WindowSettings.Input("windows", tooltip="From FlashPortrait Windows."),
    ]


def max_side_input() -> io.Int.Input:
    return io.Int.Input("max_side", default=720, min=16, max=2048, step=16,
                        tooltip="Longest side of the output (published: 720); the reference is scaled to it and "
                                "each side rounded up to a multiple of 16.")


def resume_input() -> io.Combo.Input:
    return io.Combo.Input("resume", options=list(resume_store.CHOICES), default=resume_store.OFF,
                          tooltip=RESUME_TOOLTIP)


def reference_notes(model, reference_image: torch.Tensor, acceleration: str) -> list[str]:
    """Report lines on what the run will not do as the user may expect: no face seen, 4 steps without a LoRA."""
    notes = []
    face_backend = available_face_backend()
    face_note = reference_face_note(reference_image, face_backend) if face_backend else None
    if face_note:
        logging.warning("FlashPortrait: %s", face_note)
        notes.append(face_note)
    if acceleration == FOUR_STEP_LORA and not getattr(model, "patches", None):
        notes.append(f"{FOUR_STEP_LORA}: the model carries no LoRA; without the distillation LoRA 4 steps "
                     f"give a blurred result (apply fast_lora_rank64 with LoraLoaderModelOnly)")
    return notes


def latent_notes(reference_image: torch.Tensor, emotion, windows, max_side: int, latent: torch.Tensor,
                 given: bool, denoise: float, steps: int) -> list[str]:
    """Report lines on the size and length sampled: sides rounded, windows clipped, a latent continued."""
    height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
    notes = [note for note in (window_note(emotion.num_latent_frames, windows.length),) if note]
    if given:
        notes.append(f"continued from the given latent ({width}x{height}, denoise {denoise:g}: the last {steps} "
                     f"steps of the schedule); max_side not used")
    else:
        notes.extend(note for note in (size_note(*reference_image.shape[1:3], max_side, height, width),) if note)
    return notes


class FlashPortraitSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitSampler",
            display_name="FlashPortrait Sampler",
            category="FlashPortrait",
            description="Animates the reference portrait with the driving expressions: the published sliding-window "
                        "sampling (defaults: the published settings) through ComfyUI's sampling, with latent "
                        "previews. The latents include the reference as frame 0; drop the first decoded frame. "
                        "For ComfyUI's other schedulers use FlashPortrait Guider with "
                        "SamplerCustomAdvanced.",
            inputs=[
                *guider_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed and settings give the same video."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps (published: 30)."),
                io.Float.Input("shift", default=5.0, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching schedule shift (published: 5)."),
                max_side_input(),
                io.Combo.Input("acceleration", options=list(ACCELERATIONS), default="off",
                               tooltip=ACCELERATION_TOOLTIP),
                io.Float.Input("target_speedup", default=0.0, min=0.0, max=MAX_TARGET_SPEEDUP, step=0.5,
                               tooltip=TARGET_TOOLTIP),
                io.Combo.Input("sampler", options=sampler_choices(), default=EULER, tooltip=SAMPLER_TOOLTIP),
                io.Combo.Input("schedule", options=[PUBLISHED, SIMPLE], default=PUBLISHED, tooltip=SCHEDULE_TOOLTIP),
                resume_input(),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: latents to continue from instead of noise (a refining pass, "
                                        "video-to-video); with denoise below 1 only the last part of the schedule "
                                        "runs. Leave empty to start from noise."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="Share of the schedule to run on `latent` (1 = all of it, from noise)."),
                devices_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="latent"),
                io.String.Output(display_name="report", tooltip="Windows, DiT passes, time, and what was chosen."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, acceleration: str = "off", sampler: str = "euler", target_speedup: float = 0.0,
                        schedule: str = PUBLISHED, resume: str = resume_store.OFF) -> bool | str:
        # Naming `sampler` here turns off ComfyUI's own list check for it, so the list is checked here.
        if sampler not in sampler_choices():
            return (f"sampler '{sampler}' is not available: choose euler (the published update) or one of "
                    f"ComfyUI's samplers such as ipndm or deis (the pack's own adams2 / adams3 were replaced by "
                    f"them)")
        problem = widget_problem(cls, acceleration=acceleration, target_speedup=target_speedup,
                                 schedule=schedule, resume=resume)
        if problem:
            return problem
        try:
            check_sampling_widgets(acceleration, sampler, target_speedup, schedule)
            resume_store.ResumePolicy.from_choice(resume)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, positive, negative, clip_vision_output, vae, reference_image: torch.Tensor,
                emotion, windows, seed: int, steps: int, shift: float, max_side: int, acceleration: str = "off",
                target_speedup: float = 0.0, sampler: str = "euler", schedule: str = PUBLISHED,
                resume: str = resume_store.OFF, latent: dict | None = None, denoise: float = 1.0,
                devices=None) -> io.NodeOutput:
        samples, report, text = cls.sample(model, positive, negative, clip_vision_output, vae, reference_image,
                                           emotion, windows, seed, steps, shift, max_side, acceleration,
                                           target_speedup, sampler, schedule, resume, latent, denoise, devices)
        # ui: shown on the node by web/flashportrait.js (pass counts) after the run.
        return io.NodeOutput({"samples": samples}, text, ui=sampler_ui(report, text))

    @classmethod
    def sample(cls, model, positive, negative, clip_vision_output, vae, reference_image: torch.Tensor, emotion,
               windows, seed: int, steps: int, shift: float, max_side: int, acceleration: str = "off",
               target_speedup: float = 0.0, sampler: str = "euler", schedule: str = PUBLISHED,
               resume: str = resume_store.OFF, latent: dict | None = None, denoise: float = 1.0, devices=None):
        """The node's work: (latents [1, 16, L, h, w] on the CPU, the guider's SamplingReport, report text)."""
        choice = resolve_sampling(acceleration, steps, shift, sampler, target_speedup, schedule,
                                  denoise if latent is not None else 1.0)
        guider = build_guider(model, positive, negative, clip_vision_output, vae, reference_image, emotion,
                              windows, choice.alp, resume_store.ResumePolicy.from_choice(resume), devices)
        guider.on_window_done = progress_reporter(getattr(cls.hidden, "unique_id", None))
        start = empty_video_latent(emotion, reference_image, max_side) if latent is None else latent["samples"]
        notes = [*latent_notes(reference_image, emotion, windows, max_side, start, latent is not None, denoise,
                               choice.steps),
                 *reference_notes(model, reference_image, acceleration), *choice.notes]
        noise = comfy.sample.prepare_noise(start, seed)
        callback = latent_preview.prepare_callback(model, choice.steps)
        samples = guider.sample(noise, start, step_sampler(choice.solver), choice.sigmas.float(), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return samples.cpu(), guider.report, "\n".join([guider.report.text(), *notes])
