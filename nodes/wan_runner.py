"""Runs ComfyUI's Wan model as the guided, windowed velocity the core sampler asks for."""
from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..flashportrait_core.sampling.alp import (ALPConfig, ALPWindowState, alp_step, block_change_magnitudes,
                                      new_window_state, report_lines)
from ..flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from ..flashportrait_core.sampling.guidance import combine_guidance, guidance_passes
from ..flashportrait_core.sampling.resume import (checkpoint_path, move_window_state, resume_key,
                                         sample_flow_windows_resumable)
from ..flashportrait_core.sampling.schedules import published_sigmas
from ..flashportrait_core.sampling.windows import WindowPlan
from .wan_patch import BLOCK_PROBE_KEY, EMOTION_OPTIONS_KEY, BlockProbe, EmotionPass

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
    model_passes: list[int] = field(default_factory=list)  # DiT passes per window, counted as they run
    alp_states: list[ALPWindowState] = field(default_factory=list)  # empty when ALP is off
    seconds: float = 0.0  # the whole sampler node
    denoise_seconds: float = 0.0  # the window loop alone (without encoding the reference)
    resumed_from_step: int = 0  # > 0: continued from the checkpoint of an interrupted run

    def text(self) -> str:
        lines = [f"{len(self.windows)} window(s) x {self.steps} steps, {sum(self.model_passes)} DiT passes, "
                 f"{self.seconds:.1f} s (denoising {self.denoise_seconds:.1f} s)"]
        if self.resumed_from_step:
            lines.append(f"  resumed from step {self.resumed_from_step} of {self.steps} (checkpoint of an "
                         f"interrupted run)")
        for k, ((start, end), passes) in enumerate(zip(self.windows, self.model_passes)):
            line = f"  window {k}: latent frames {start}-{end - 1}, {passes} DiT passes"
            if self.alp_states:
                counts = self.alp_states[k].report()
                line += f" (ALP: {counts['computed']} steps computed, {counts['skipped']} skipped)"
            lines.append(line)
        if self.alp_states:
            lines.append("  " + report_lines(self.alp_states)[-1])
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

    def _model_velocity(self, x: torch.Tensor, sigma: float, pass_name: str, emotion_tokens: torch.Tensor,
                        probe: BlockProbe | None = None) -> torch.Tensor:
        conds = self.conds[pass_name]
        ip_scale = self.emotion.ip_scale if pass_name == "posi" else 0.0
        options = dict(self.base_options)
        options[EMOTION_OPTIONS_KEY] = EmotionPass(tokens=emotion_tokens, ip_scale=ip_scale)
        if probe is not None and pass_name == "posi":
            options[BLOCK_PROBE_KEY] = probe
        frames = x.shape[2]
        c_concat = conds["c_concat"][:, :, :frames].to(self.device)
        sigma_t = torch.full((x.shape[0],), sigma, device=self.device)
        denoised = self.model.apply_model(x.to(self.device), sigma_t, c_concat=c_concat,
                                          c_crossattn=conds["c_crossattn"].to(self.device),
                                          clip_fea=conds["clip_fea"].to(self.device) if "clip_fea" in conds else None,
                                          transformer_options=options)
        # ComfyUI's flow models return x0 = x - sigma * v; the core integrates v.
        return (x.to(self.device) - denoised.float()) / sigma

    def guided(self, x: torch.Tensor, sigma: float, window: int, probe: BlockProbe | None = None
               ) -> torch.Tensor:
        """All guided passes of one window at one noise level, combined."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        start, end = self.plan.windows[window]
        tokens = self.emotion.latent_tokens_for(start, end).unsqueeze(0).to(self.device)
        predictions = {name: self._model_velocity(x, sigma, name, tokens, probe) for name in self.passes}
        self.report.model_passes[window] += len(self.passes)
        return combine_guidance(predictions, self.emotion.emo_cfg, self.emotion.text_cfg).to(x.device)

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        velocity = self.guided(x, sigma, window)
        if self.progress is not None:
            self.progress.update(1)
        return velocity


def probe_blocks(num_blocks: int, count: int = 6) -> tuple[int, ...]:
    """Up to ``count`` block indices spread evenly from the first block to the last."""
    if num_blocks <= count:
        return tuple(range(num_blocks))
    return tuple(round(i * (num_blocks - 1) / (count - 1)) for i in range(count))


class AcceleratedVelocity:
    """Adaptive Latent Prediction around the guided model: each window forecasts the steps it skips.

    Each window keeps its own ALP state. At computed steps the patched blocks report a strided sample of
    their outputs, whose change since the window's previous computed step feeds ALP's layer-aware dial.
    The core sampler blends velocities, so a window's ALP step is handed back as the velocity that moves
    its latents to the same place.
    """

    def __init__(self, guided: GuidedWanVelocity, sigmas: torch.Tensor, config: ALPConfig, num_blocks: int):
        self.guided = guided
        self.states = [new_window_state(sigmas, config) for _ in guided.plan.windows]
        guided.report.alp_states = self.states
        self.blocks = probe_blocks(num_blocks)
        self.previous_outputs: list[list[torch.Tensor] | None] = [None] * len(self.states)
        self.storage_device: torch.device | None = None  # set: window states rest there between visits

    def checkpoint_state(self) -> dict:
        return {"previous_block_outputs": [list(p) if p is not None else None for p in self.previous_outputs]}

    def restore_checkpoint_state(self, saved: dict) -> None:
        self.previous_outputs = list(saved["previous_block_outputs"])

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        state = self.states[window]
        move_window_state(state, x.device)  # from the storage device, or a restored checkpoint
        probe = BlockProbe(self.blocks)

        def block_changes() -> list[float] | None:
            current = [probe.outputs[i] for i in self.blocks if i in probe.outputs]
            previous, self.previous_outputs[window] = self.previous_outputs[window], current
            if previous is None or len(current) < 2 or len(previous) != len(current):
                return None
            return block_change_magnitudes(previous, current)

        x_next, _ = alp_step(state, x, step, lambda latents, s: self.guided.guided(latents, s, window, probe),
                             block_changes)
        if self.storage_device is not None:
            move_window_state(state, self.storage_device)
        if self.guided.progress is not None:
            self.guided.progress.update(1)
        return (x_next - x) / (state.sigmas[step + 1] - state.sigmas[step])


class SamplingOutOfMemory(comfy.model_management.OOM_EXCEPTION):
    """Sampling ran out of memory; the message names the settings to lower. (Still an OOM for ComfyUI, which
    then unloads its models.)"""


def out_of_memory_message(error: BaseException, plan: WindowPlan, height: int, width: int) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"FlashPortrait Sampler ran out of memory sampling {len(plan.windows)} window(s) of "
            f"{plan.window_length} latent frames at {width}x{height} ({first_line}). Lower window_length in "
            f"FlashPortrait Windows (now {plan.window_length}) or max_side in the sampler, load the model with "
            f"weight_dtype fp8_e4m3fn, or start ComfyUI with --lowvram so weights are offloaded; an acceleration "
            f"preset (ALP) shortens the run but does not lower the peak memory.")


RESUME_SUBFOLDER = "flashportrait_resume"


def resume_folder() -> str:
    """Checkpoints of unfinished runs live in the output folder: ComfyUI empties its temp folder at every start,
    which would lose them after a crash."""
    return os.path.join(folder_paths.get_output_directory(), RESUME_SUBFOLDER)


def latent_storage_device(load_device: torch.device | str, plan: WindowPlan) -> torch.device:
    """Where the full latents live: on the host whenever the model runs elsewhere and there is more than one
    window, so the accelerator holds one window's latents at a time (the copies are small next to a DiT pass);
    otherwise on the model's device."""
    device = torch.device(load_device)
    return torch.device("cpu") if device.type != "cpu" and len(plan.windows) > 1 else device


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


@contextmanager
def portrait_encoder_on(device: torch.device | str, emotion: EmotionConditioning) -> Iterator[None]:
    """Keep the portrait encoder on the sampling device while the windows are sampled.

    The emotion tokens are encoded per window at every step (host memory stays flat with the video); on a GPU
    that is negligible beside a DiT pass, on the CPU it takes seconds per window visit. The encoder goes back
    where it was afterwards; when it does not fit, tokens are encoded where it is.
    """
    encoder, device = emotion.encoder, torch.device(device)
    home = next(encoder.parameters()).device if encoder is not None else device
    if encoder is None or home == device:
        yield
        return
    try:
        comfy.model_management.free_memory(
            sum(t.numel() * t.element_size() for t in encoder.state_dict().values()), device)
        encoder.to(device)
    except comfy.model_management.OOM_EXCEPTION:
        encoder.to(home)
    try:
        yield
    finally:
        encoder.to(home)


def run_flashportrait_sampling(model_patcher, vae, positive: torch.Tensor, negative: torch.Tensor,
                               clip_vision_output, reference: torch.Tensor, emotion: EmotionConditioning,
                               plan: WindowPlan, seed: int, steps: int, shift: float, height: int, width: int,
                               alp: ALPConfig | None = None, sigmas: torch.Tensor | None = None,
                               solver: str = "euler") -> tuple[torch.Tensor, SamplingReport]:
    """Sample all latent frames window by window; returns latents in VAE space [1, 16, L, h, w] and a report.

    ``sigmas`` replaces the published ``published_sigmas(steps, shift)`` grid (``steps`` must then be
    ``len(sigmas) - 1``); ``solver`` is the window loop's step update (``solvers.STEP_SOLVERS``).

    On out-of-memory, what the run allocated is released (the failed frames' tensors included) and
    ``SamplingOutOfMemory`` names the settings to lower.
    """
    try:
        with portrait_encoder_on(model_patcher.load_device, emotion):
            return _sample_all_windows(model_patcher, vae, positive, negative, clip_vision_output, reference,
                                       emotion, plan, seed, steps, shift, height, width, alp, sigmas, solver)
    except comfy.model_management.OOM_EXCEPTION as error:
        if isinstance(error, SamplingOutOfMemory):
            raise
        message = out_of_memory_message(error, plan, height, width)
        # The traceback's frames hold the activations and latents of the failed step: drop them, then the cache.
        traceback.clear_frames(error.__traceback__)
        del error
        comfy.model_management.soft_empty_cache()
    raise SamplingOutOfMemory(message)


def _sample_all_windows(model_patcher, vae, positive: torch.Tensor, negative: torch.Tensor,
                        clip_vision_output, reference: torch.Tensor, emotion: EmotionConditioning,
                        plan: WindowPlan, seed: int, steps: int, shift: float, height: int, width: int,
                        alp: ALPConfig | None = None, sigmas: torch.Tensor | None = None,
                        solver: str = "euler") -> tuple[torch.Tensor, SamplingReport]:
    started = time.perf_counter()
    concat_latent, concat_mask = reference_condition(vae, reference, height, width, plan.window_length)
    comfy.model_management.load_models_gpu([model_patcher])
    report = SamplingReport(windows=list(plan.windows), steps=steps, model_passes=[0] * len(plan.windows))
    progress = comfy.utils.ProgressBar(steps * len(plan.windows))
    velocity = GuidedWanVelocity(model_patcher, positive, negative, clip_vision_output, concat_latent,
                                 concat_mask, emotion, plan, report, progress)
    sigmas = published_sigmas(steps, shift) if sigmas is None else sigmas
    if alp is not None and alp.enabled:
        velocity = AcceleratedVelocity(velocity, sigmas, alp, len(model_patcher.model.diffusion_model.blocks))
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 16, plan.num_frames, height // 8, width // 8), generator=generator)
    denoise_started = time.perf_counter()
    storage = latent_storage_device(model_patcher.load_device, plan)
    guided = velocity.guided if isinstance(velocity, AcceleratedVelocity) else velocity
    accelerated = velocity if isinstance(velocity, AcceleratedVelocity) else None
    if accelerated is not None and storage != torch.device(model_patcher.load_device):
        accelerated.storage_device = storage
    key = resume_key(seed=seed, steps=steps, shift=shift, sigmas=sigmas, solver=solver, size=(height, width), num_frames=plan.num_frames,
                     windows=plan.windows, emotion=emotion, conds=guided.conds, alp=alp if alp and alp.enabled
                     else None, model=model_fingerprint(model_patcher))

    def save_extra() -> dict:
        extra = {"model_passes": list(report.model_passes)}
        if accelerated is not None:
            extra.update(accelerated.checkpoint_state())
        return extra

    def restore_extra(saved: dict) -> None:
        report.model_passes[:] = saved["model_passes"]
        if accelerated is not None:
            accelerated.restore_checkpoint_state(saved)

    latents, report.resumed_from_step = sample_flow_windows_resumable(
        noise.to(storage), sigmas, plan, velocity, checkpoint_path(resume_folder(), key),
        key, accelerated.states if accelerated is not None else (), save_extra, restore_extra,
        compute_device=model_patcher.load_device, solver=solver)
    report.denoise_seconds = time.perf_counter() - denoise_started
    report.seconds = time.perf_counter() - started
    latents = model_patcher.model.process_latent_out(latents.cpu())
    return latents, report
