"""The FlashPortrait sampler node: windowed flow-matching sampling of the whole video."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..flashportrait_core.expression.backends import FaceBackendChoice, FaceBackendUnavailableError, \
    resolve_face_backend
from ..flashportrait_core.expression.reference_check import reference_face_note
from ..flashportrait_core.sampling.choice import ACCELERATIONS, FOUR_STEP_LORA, resolve_sampling
from ..flashportrait_core.sampling.solvers import STEP_SOLVERS
from ..flashportrait_core.validation import check_sampler_inputs, size_note, window_note
from ..flashportrait_core.sampling.windows import plan_windows
from . import types
from .loaders import insightface_roots
from .report_ui import sampler_ui
from .wan_runner import generation_size, run_flashportrait_sampling


def available_face_backend() -> FaceBackendChoice | None:
    """The face backend `auto` would pick, or None where none is installed (the reference is then not checked)."""
    try:
        return resolve_face_backend("auto", insightface_roots())
    except FaceBackendUnavailableError:
        return None


class FlashPortraitSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitSampler",
            display_name="FlashPortrait Sampler",
            category="FlashPortrait",
            description="Animates the reference portrait with the driving expressions: flow-matching Euler over "
                        "sliding windows, every window conditioned on the reference image as published. The "
                        "latents include the reference as frame 0; drop the first decoded frame.",
            inputs=[
                io.Model.Input("model", tooltip="From FlashPortrait Model Loader (LoRAs may be applied)."),
                io.Conditioning.Input("positive", tooltip="Encoded prompt (umT5, CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="Encoded negative prompt; used when text_cfg > 1."),
                io.ClipVisionOutput.Input("clip_vision_output",
                                          tooltip="CLIP Vision Encode of the reference image (clip_vision_h)."),
                io.Vae.Input("vae", tooltip="Wan 2.1 VAE, used to encode the reference image."),
                io.Image.Input("reference_image", tooltip="The portrait to animate (first image is used)."),
                types.EmotionConditioning.Input("emotion", tooltip="From FlashPortrait Emotion Conditioning."),
                types.WindowSettings.Input("windows", tooltip="From FlashPortrait Windows."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed and settings give the same video."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps (published: 30)."),
                io.Float.Input("shift", default=5.0, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching schedule shift (published: 5 at 720p, 3 at 480p)."),
                io.Int.Input("max_side", default=720, min=16, max=2048, step=16,
                             tooltip="Longest side of the output; the reference is scaled to it and each side "
                                     "rounded up to a multiple of 16."),
                io.Combo.Input("acceleration", options=list(ACCELERATIONS), default="quality",
                               tooltip="Adaptive Latent Prediction: skips DiT passes by forecasting the latent "
                                       "trajectory of each window. quality ~3x, balanced ~4x, fast ~6x fewer "
                                       "passes; off computes every step. '4-step LoRA': the published fast "
                                       "path, 4 Euler steps at timesteps 1000/750/500/250 (steps is not used); "
                                       "apply the distillation LoRA to the model first (LoraLoaderModelOnly)."),
                io.Float.Input("target_speedup", default=0.0, min=0.0, max=10.0, step=0.5,
                               tooltip="Optional: a target speed-up (e.g. 5 = a fifth of the DiT passes) instead "
                                       "of the preset; 0 uses the preset."),
                io.Combo.Input("sampler", options=list(STEP_SOLVERS), default="euler",
                               tooltip="Step update of the window loop. euler: as published. adams2 / adams3: "
                                       "multistep (Adams-Bashforth) over the last velocities, more accurate at the "
                                       "same number of DiT passes (adams3 from 8 steps); needs acceleration off."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent"),
                io.String.Output(display_name="report", tooltip="Windows, DiT passes and time."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, clip_vision_output, vae, reference_image: torch.Tensor,
                emotion, windows, seed: int, steps: int, shift: float, max_side: int, acceleration: str = "quality",
                target_speedup: float = 0.0, sampler: str = "euler") -> io.NodeOutput:
        check_sampler_inputs(reference_image, emotion.latent_tokens_for(0, 1), positive[0][0], negative[0][0],
                             getattr(clip_vision_output, "penultimate_hidden_states", None))
        height, width = generation_size(reference_image.shape[1], reference_image.shape[2], max_side)
        notes = [note for note in (size_note(*reference_image.shape[1:3], max_side, height, width),
                                   window_note(emotion.num_latent_frames, windows.length)) if note]
        plan = plan_windows(emotion.num_latent_frames, windows.length, windows.overlap)
        choice = resolve_sampling(acceleration, steps, shift, sampler, target_speedup)
        notes.extend(choice.notes)
        face_backend = available_face_backend()
        face_note = reference_face_note(reference_image, face_backend) if face_backend else None
        if face_note:
            logging.warning("FlashPortrait Sampler: %s", face_note)
            notes.append(face_note)
        if acceleration == FOUR_STEP_LORA and not getattr(model, "patches", None):
            notes.append(f"{FOUR_STEP_LORA}: the model carries no LoRA; without the distillation LoRA 4 steps "
                         f"give a blurred result (apply fast_lora_rank64 with LoraLoaderModelOnly)")
        latents, report = run_flashportrait_sampling(
            model, vae, positive[0][0], negative[0][0], clip_vision_output, reference_image, emotion, plan,
            seed, choice.steps, shift, height, width, choice.alp, choice.sigmas, choice.solver)
        text = "\n".join([report.text(), *notes])
        # ui: shown on the node by web/flashportrait.js (pass counts) after the run.
        return io.NodeOutput({"samples": latents}, text, ui=sampler_ui(report, text))
