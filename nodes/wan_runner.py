"""Runs ComfyUI's Wan model as the guided, windowed velocity the core sampler asks for."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import comfy.model_management
import comfy.utils
import torch

from ..flashportrait_core.emotion_conditioning import EmotionConditioning
from ..flashportrait_core.guidance import combine_guidance, guidance_passes
from ..flashportrait_core.sampling import flow_sigmas, sample_flow_windows
from ..flashportrait_core.windows import WindowPlan
from .wan_patch import EMOTION_OPTIONS_KEY, EmotionPass

SIDE_MULTIPLE = 16  # the VAE halves 8x and the DiT patches 2x2


def generation_size(image_height: int, image_width: int, max_side: int) -> tuple[int, int]:
    """Published sizing: scale the longest side to ``max_side``, round each side up to a multiple of 16."""
    scale = max_side / max(image_height, image_width)
    height, width = int(image_height * scale), int(image_width * scale)
    round_up = lambda side: max(SIDE_MULTIPLE, math.ceil(side / SIDE_MULTIPLE) * SIDE_MULTIPLE)  # noqa: E731
    return round_up(height), round_up(width)


def reference_condition(vae, reference: torch.Tensor, height: int, width: int, latent_frames: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-video condition of one window: the reference at frame 0, mid-grey (zero in [-1, 1]) after it.

    Returns the VAE latent [1, 16, latent_frames, h, w] and the known-frame mask [1, 1, latent_frames, h, w]
    (0 where known: latent frame 0), in the form ComfyUI's Wan model takes as ``concat_latent_image`` and
    ``concat_mask``.
    """
    image = comfy.utils.common_upscale(reference[:1, :, :, :3].movedim(-1, 1), width, height, "lanczos",
                                       "disabled").movedim(1, -1).clamp(0, 1)
    video_frames = (latent_frames - 1) * 4 + 1
    pixels = torch.full((video_frames, height, width, 3), 0.5, dtype=image.dtype)
    pixels[0] = image[0]
    latent = vae.encode(pixels)
    mask = torch.ones((1, 1, latent_frames, latent.shape[-2], latent.shape[-1]), dtype=latent.dtype)
    mask[:, :, 0] = 0.0
    return latent, mask


@dataclass
class SamplingReport:
    windows: list[tuple[int, int]]
    steps: int
    model_passes: list[int] = field(default_factory=list)  # DiT passes per window
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"{len(self.windows)} window(s) x {self.steps} steps, {sum(self.model_passes)} DiT passes, "
                 f"{self.seconds:.1f} s"]
        lines += [f"  window {k}: latent frames {s}-{e - 1}, {n} DiT passes"
                  for k, ((s, e), n) in enumerate(zip(self.windows, self.model_passes))]
        return "\n".join(lines)


class GuidedWanVelocity:
    """Per window: the 1-3 guided passes of ComfyUI's Wan model combined into one flow velocity."""

    def __init__(self, model_patcher, positive: torch.Tensor, negative: torch.Tensor,
                 clip_vision_output, concat_latent: torch.Tensor, concat_mask: torch.Tensor,
                 emotion: EmotionConditioning, plan: WindowPlan, report: SamplingReport,
                 progress: comfy.utils.ProgressBar | None = None):
        self.model = model_patcher.model
        self.device = model_patcher.load_device
        self.emotion = emotion
        self.plan = plan
        self.report = report
        self.progress = progress
        self.passes = guidance_passes(emotion.emo_cfg, emotion.text_cfg)
        self.base_options = model_patcher.model_options.get("transformer_options", {})
        window_noise = torch.zeros((1, concat_latent.shape[1], plan.window_length, *concat_latent.shape[-2:]))
        contexts = {"posi": positive, "no_emo": positive, "no_cond": negative}
        # Conditions are the same for every window of the plan's length: encode them once.
        self.conds = {}
        for name in self.passes:
            conds = self.model.extra_conds(noise=window_noise, device=self.device,
                                           concat_latent_image=concat_latent, concat_mask=concat_mask,
                                           cross_attn=contexts[name], clip_vision_output=clip_vision_output)
            self.conds[name] = {key: cond.cond for key, cond in conds.items()}

    def _model_velocity(self, x: torch.Tensor, sigma: float, pass_name: str, emotion_tokens: torch.Tensor
                        ) -> torch.Tensor:
        conds = self.conds[pass_name]
        ip_scale = self.emotion.ip_scale if pass_name == "posi" else 0.0
        options = dict(self.base_options)
        options[EMOTION_OPTIONS_KEY] = EmotionPass(tokens=emotion_tokens, ip_scale=ip_scale)
        frames = x.shape[2]
        c_concat = conds["c_concat"][:, :, :frames].to(self.device)
        sigma_t = torch.full((x.shape[0],), sigma, device=self.device)
        denoised = self.model.apply_model(x.to(self.device), sigma_t, c_concat=c_concat,
                                          c_crossattn=conds["c_crossattn"].to(self.device),
                                          clip_fea=conds["clip_fea"].to(self.device) if "clip_fea" in conds else None,
                                          transformer_options=options)
        # ComfyUI's flow models return x0 = x - sigma * v; the core integrates v.
        return (x.to(self.device) - denoised.float()) / sigma

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        start, end = self.plan.windows[window]
        tokens = self.emotion.latent_tokens[start:end].unsqueeze(0).to(self.device)
        predictions = {name: self._model_velocity(x, sigma, name, tokens) for name in self.passes}
        self.report.model_passes[window] += len(self.passes)
        if self.progress is not None:
            self.progress.update(1)
        return combine_guidance(predictions, self.emotion.emo_cfg, self.emotion.text_cfg).to(x.device)


def run_flashportrait_sampling(model_patcher, vae, positive: torch.Tensor, negative: torch.Tensor,
                               clip_vision_output, reference: torch.Tensor, emotion: EmotionConditioning,
                               plan: WindowPlan, seed: int, steps: int, shift: float, height: int, width: int
                               ) -> tuple[torch.Tensor, SamplingReport]:
    """Sample all latent frames window by window; returns latents in VAE space [1, 16, L, h, w] and a report."""
    started = time.perf_counter()
    concat_latent, concat_mask = reference_condition(vae, reference, height, width, plan.window_length)
    comfy.model_management.load_models_gpu([model_patcher])
    report = SamplingReport(windows=list(plan.windows), steps=steps, model_passes=[0] * len(plan.windows))
    progress = comfy.utils.ProgressBar(steps * len(plan.windows))
    velocity = GuidedWanVelocity(model_patcher, positive, negative, clip_vision_output, concat_latent,
                                 concat_mask, emotion, plan, report, progress)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 16, plan.num_frames, height // 8, width // 8), generator=generator)
    latents = sample_flow_windows(noise.to(velocity.device), flow_sigmas(steps, shift), plan, velocity)
    report.seconds = time.perf_counter() - started
    latents = model_patcher.model.process_latent_out(latents.cpu())
    return latents, report
