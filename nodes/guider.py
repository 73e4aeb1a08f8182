"""FlashPortrait as a ComfyUI guider: the published windowed guidance, driven by any of ComfyUI's samplers.

Each call of the guider is one evaluation of the whole video at one noise level. Every sliding window is
conditioned as published (the reference at its local frame 0, the CLIP context of the reference, its own emotion
tokens), evaluated with the published guidance passes through ComfyUI's ``calc_cond_batch`` (so hooks,
timestep-ranged and combined conditioning, model wrappers and LoRAs apply), and the windows' denoised predictions
are blended with the published cross-fade (an overwrite at the first step). For Euler this is exactly the
published loop, which blends the windows' stepped latents: the Euler step is linear in the prediction.

Adaptive Latent Prediction runs per window inside the guider: at a skipped step the window's guided prediction is
forecast instead of evaluated. Its forecasts integrate Euler steps, so it needs ComfyUI's ``euler`` sampler.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ..flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from ..flashportrait_core.sampling.alp import (ALPConfig, ALPWindowState, alp_step, block_change_magnitudes,
                                               new_window_state, report_lines)
from ..flashportrait_core.sampling.guidance import PASSES, combine_guidance, guidance_passes
from ..flashportrait_core.sampling.loop import blend_windows
from ..flashportrait_core.sampling.resume import move_window_state
from ..flashportrait_core.sampling.windows import WindowPlan, blend_weights, plan_windows
from ..flashportrait_core.validation import check_sampler_inputs
from .resume_store import ResumePolicy, ResumeSession, is_euler
from .wan_patch import BLOCK_PROBE_KEY, EMOTION_OPTIONS_KEY, BlockProbe, EmotionPass
from .wan_runner import (SamplingOutOfMemory, generation_size, latent_storage_device, out_of_memory_message,
                         portrait_encoder_on, reference_condition)

# Conditioning keys the guider sets itself for every window: an upstream image-to-video node's would describe the
# whole video, not a window.
_WINDOW_KEYS = ("concat_latent_image", "concat_mask", "concat_mask_index")
# Patches that replace ComfyUI's two-condition CFG combination; the published guidance has up to three passes.
_CFG_PATCHES = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function")


@dataclass
class SamplingReport:
    windows: list[tuple[int, int]]
    steps: int
    passes: tuple[str, ...]
    model_passes: list[int] = field(default_factory=list)  # DiT passes per window, counted as they run
    alp_states: list[ALPWindowState] = field(default_factory=list)  # empty when ALP is off
    sampler: str = "euler"
    seconds: float = 0.0  # the whole sampling call, encoding the reference included
    denoise_seconds: float = 0.0  # the denoising loop alone
    resumed_from: str = ""  # "step 12" / "step 12, window 3" when continued from a checkpoint
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"{len(self.windows)} window(s) x {self.steps} steps ({self.sampler}), "
                 f"{sum(self.model_passes)} DiT passes ({'+'.join(self.passes)} per window step), "
                 f"{self.seconds:.1f} s (denoising {self.denoise_seconds:.1f} s)"]
        if self.resumed_from:
            lines.append(f"  resumed from {self.resumed_from} (checkpoint of an interrupted run)")
        for k, ((start, end), passes) in enumerate(zip(self.windows, self.model_passes)):
            line = f"  window {k}: latent frames {start}-{end - 1}, {passes} DiT passes"
            if self.alp_states:
                counts = self.alp_states[k].report()
                line += f" (ALP: {counts['computed']} steps computed, {counts['skipped']} skipped)"
            lines.append(line)
        if self.alp_states:
            lines.append("  " + report_lines(self.alp_states)[-1])
        lines.extend(self.notes)
        return "\n".join(lines)


def probe_blocks(num_blocks: int, count: int = 6) -> tuple[int, ...]:
    """Up to ``count`` block indices spread evenly from the first block to the last (ALP's layer dial)."""
    if num_blocks <= count:
        return tuple(range(num_blocks))
    return tuple(round(i * (num_blocks - 1) / (count - 1)) for i in range(count))


def sampler_name(sampler) -> str:
    """A SAMPLER's name for the report: its ``label``, or its k-diffusion function's name (``euler``)."""
    function = getattr(sampler, "sampler_function", None)
    return getattr(sampler, "label", None) or getattr(function, "__name__", type(sampler).__name__).removeprefix(
        "sample_")


def schedule_step(sample_sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """The step of the schedule being sampled that evaluates at noise level ``sigma``: the index of ``sigma`` in the
    schedule, or for a sampler's intermediate evaluation (Heun, 2S, ...) the step whose interval holds it."""
    levels = sample_sigmas.detach().cpu().double()
    value = float(sigma.reshape(-1)[0])
    matches = torch.nonzero(torch.isclose(levels, torch.tensor(value, dtype=torch.float64), rtol=1e-4, atol=0.0))
    if matches.numel():
        return int(matches[0].item())
    above = torch.nonzero(levels[:-1] > value)
    if above.numel() == 0:
        raise ValueError(f"noise level {value:.6g} is above the schedule being sampled (starts at "
                         f"{float(levels[0]):.6g})")
    return int(above[-1].item())


def window_conditioning(conditioning: list, clip_vision_output) -> tuple[list, list[str]]:
    """Copies of a CONDITIONING's entries ready for the windows, and notes on what was changed.

    Every entry is kept (ComfyUI averages combined entries and honours timestep ranges); the reference's CLIP
    output is set on each; an upstream image-to-video condition is replaced by the window's own.
    """
    entries, notes = [], []
    for index, (cross_attn, options) in enumerate(conditioning):
        if "area" in options or "mask" in options:
            raise ValueError(f"conditioning entry {index} is limited to an area or mask; FlashPortrait samples "
                             f"sliding windows of the whole frame, so area and mask conditioning cannot apply. "
                             f"Use plain prompts (Conditioning Combine and timestep ranges work)")
        options = dict(options)
        dropped = [key for key in _WINDOW_KEYS if options.pop(key, None) is not None]
        if dropped:
            notes.append(f"conditioning entry {index}: {', '.join(dropped)} from upstream replaced by the "
                         f"windows' own reference condition")
        if clip_vision_output is not None:
            options["clip_vision_output"] = clip_vision_output
        entries.append([cross_attn, options])
    return entries, notes


class FlashPortraitGuider(comfy.samplers.CFGGuider):
    """Windowed FlashPortrait guidance for ComfyUI's sampling (``SamplerCustomAdvanced`` or the sampler node)."""

    def __init__(self, model_patcher, vae, reference_image: torch.Tensor, clip_vision_output,
                 emotion: EmotionConditioning, window_length: int, window_overlap: int,
                 alp: ALPConfig | None = None, resume: ResumePolicy | None = None):
        super().__init__(model_patcher)
        self.vae = vae
        self.reference_image = reference_image
        self.clip_vision_output = clip_vision_output
        self.emotion = emotion
        self.window_length = window_length
        self.window_overlap = window_overlap
        self.alp = alp if alp is not None and alp.enabled else None
        self.resume = resume or ResumePolicy()
        self.passes = guidance_passes(emotion.emo_cfg, emotion.text_cfg)
        self.condition_notes: list[str] = []
        self.report: SamplingReport | None = None  # the last run's
        self.on_window_done = None  # optional callable(step, steps, window, windows) for progress
        self.report_node_id: str | None = None  # a FlashPortrait Guider node that shows the report after a run
        self._reference_cache: dict = {}

    def set_conds(self, positive: list, negative: list) -> None:
        positive, notes = window_conditioning(positive, self.clip_vision_output)
        negative, negative_notes = window_conditioning(negative, self.clip_vision_output)
        self.condition_notes = notes + [note.replace("conditioning", "negative conditioning", 1)
                                        for note in negative_notes]
        self.inner_set_conds({"positive": positive, "negative": negative})

    def plan(self, latent_frames: int) -> WindowPlan:
        return plan_windows(latent_frames, self.window_length, self.window_overlap)

    # -- sampling ------------------------------------------------------------------------------------------

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        started = time.perf_counter()
        self._refuse_unusable(latent_image, sampler)
        self._start_run(noise, latent_image, sampler, sigmas, seed)
        sampler, callback = self._session.resumed_sampler(sampler, callback)
        out_of_memory = None
        try:
            with portrait_encoder_on(self.model_patcher.load_device, self.emotion):
                output = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                        seed)
        except comfy.model_management.OOM_EXCEPTION as error:
            if isinstance(error, SamplingOutOfMemory):
                raise
            out_of_memory = out_of_memory_message(error, self._plan, latent_image.shape[-2] * 8,
                                                  latent_image.shape[-1] * 8)
            # The traceback's frames hold the activations and latents of the failed step: drop them, then the cache.
            traceback.clear_frames(error.__traceback__)
            del error
            comfy.model_management.soft_empty_cache()
        if out_of_memory is not None:
            raise SamplingOutOfMemory(out_of_memory)  # raised outside the handler: nothing of the failure is kept
        self._session.finish()
        self.report.notes.extend(self._session.notes)
        self.report.denoise_seconds = time.perf_counter() - (self._denoise_started or started)
        self.report.seconds = time.perf_counter() - started
        if self.report_node_id is not None:
            send_report(self.report_node_id, self.report)
        return output

    def _refuse_unusable(self, latent_image: torch.Tensor, sampler) -> None:
        """What this guider cannot sample, refused before anything is encoded or written."""
        if latent_image.ndim != 5 or latent_image.shape[2] != self.emotion.num_latent_frames:
            frames = latent_image.shape[2] if latent_image.ndim == 5 else "no"
            raise ValueError(f"the latent has {frames} latent frames but the emotion conditioning drives "
                             f"{self.emotion.num_latent_frames} ({self.emotion.num_video_frames} video frames); "
                             f"use the latent output of FlashPortrait Guider (or a latent made for the same "
                             f"driving video)")
        if self.alp is not None and not is_euler(sampler):
            raise ValueError("ALP (acceleration) forecasts the skipped steps of an Euler trajectory, so it runs "
                             "only with the euler sampler: choose euler in KSamplerSelect, or set acceleration "
                             "to off to use another sampler")
        cache = self.model_options.get("transformer_options", {}).get("easycache")
        if cache is not None:
            raise ValueError(f"{type(cache).__name__} (EasyCache / LazyCache node) cannot apply to FlashPortrait's "
                             f"windows: it keeps one cached residual per condition and one skip decision per step, "
                             f"but every window evaluates the same conditions, so it would reuse another window's "
                             f"residual. Remove it and use the acceleration setting (ALP), which forecasts each "
                             f"window separately")

    def _start_run(self, noise: torch.Tensor, latent_image: torch.Tensor, sampler, sigmas: torch.Tensor,
                   seed: int | None) -> None:
        """The run's window plan, reference condition, report, ALP states and resume session."""
        self._plan = self.plan(latent_image.shape[2])
        self._concat = self._reference(latent_image.shape[-2] * 8, latent_image.shape[-1] * 8,
                                       self._plan.window_length)
        self._sigmas = sigmas.detach().cpu().double()
        self.report = SamplingReport(windows=list(self._plan.windows), steps=len(sigmas) - 1, passes=self.passes,
                                     model_passes=[0] * len(self._plan.windows), sampler=sampler_name(sampler),
                                     notes=list(self.condition_notes))
        if any(name in self.model_options for name in _CFG_PATCHES):
            self.report.notes.append("model patches that replace ComfyUI's two-condition CFG were not applied "
                                     "(FlashPortrait combines its own guidance passes)")
        self._states = [new_window_state(self._sigmas, self.alp) for _ in self._plan.windows] if self.alp else []
        self.report.alp_states = self._states
        self._previous_outputs = [None] * len(self._plan.windows)
        self._blocks = probe_blocks(len(self.model_patcher.model.diffusion_model.blocks))
        self._denoise_started = None
        self._session = ResumeSession.open(self, noise, latent_image, sampler, self._sigmas, seed)

    def _reference(self, height: int, width: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference as every window's image-to-video condition at this size (encoded once per size)."""
        key = (height, width, frames)
        if key not in self._reference_cache:
            self._reference_cache = {key: reference_condition(self.vae, self.reference_image, height, width,
                                                              frames)}
        return self._reference_cache[key]

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                     disable_pbar=False, seed=None, latent_shapes=None):
        # As ComfyUI's, except for two things: the memory estimate is for one window (a DiT pass sees one window
        # at a time), and the full latents stay on the storage device (the host when the model runs on an
        # accelerator and there are several windows), so the accelerator holds one window's latents at a time.
        window_shape = list(noise.shape)
        window_shape[2] = self._plan.window_length
        self.inner_model, self.conds, self.loaded_models = comfy.sampler_helpers.prepare_sampling(
            self.model_patcher, window_shape, self.conds, self.model_options)
        device = self.model_patcher.load_device
        storage = latent_storage_device(device, self._plan)
        if denoise_mask is not None:
            denoise_mask = comfy.sampler_helpers.prepare_mask(denoise_mask, noise.shape, storage)
        # A copy of the sigmas: some of ComfyUI's samplers write into them (uni_pc sets the last level to 0.001),
        # which would change a SIGMAS output other samplers of the same graph read.
        noise, latent_image = noise.to(storage), latent_image.to(storage)
        sigmas = sigmas.to(storage, copy=True)
        comfy.samplers.cast_to_load_options(self.model_options, device=device,
                                            dtype=self.model_patcher.model_dtype())
        try:
            self.model_patcher.pre_run()
            output = self.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                       disable_pbar, seed, latent_shapes=latent_shapes)
        finally:
            self.model_patcher.cleanup()
        comfy.sampler_helpers.cleanup_models(self.conds, self.loaded_models)
        del self.inner_model
        del self.loaded_models
        return output

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                     seed, latent_shapes=None):
        # The model's conditions are made for one window: every window has the same image-to-video condition,
        # which made for the whole video would be a zero tensor as long as the video on the accelerator.
        window_noise = torch.zeros((*noise.shape[:2], self._plan.window_length, *noise.shape[3:]),
                                   dtype=noise.dtype, device=device)
        concat_latent, concat_mask = self._concat
        for name in ("positive", "negative"):
            self.conds[name] = [dict(entry, concat_latent_image=concat_latent, concat_mask=concat_mask)
                                for entry in self.conds[name]]
        self.conds = comfy.samplers.process_conds(self.inner_model, window_noise, self.conds, device, seed=seed)
        del window_noise
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = self.inner_model.process_latent_in(latent_image)
        model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
        model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": model_options, "seed": seed}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler, comfy.patcher_extension.get_all_wrappers(
                comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, model_options, is_model_options=True))
        self._denoise_started = time.perf_counter()
        samples = executor.execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                   disable_pbar)
        return self.inner_model.process_latent_out(samples.to(torch.float32))

    # -- one evaluation of the whole video -----------------------------------------------------------------

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = schedule_step(model_options["transformer_options"]["sample_sigmas"], timestep[:1])
        first_window, blended = self._session.before_step(step, x)
        device = self.model_patcher.load_device
        windows = len(self._plan.windows)

        def predict(k: int, window_x: torch.Tensor) -> torch.Tensor:
            denoised = self._window_prediction(k, window_x, timestep.to(window_x.device), model_options, step)
            if self.on_window_done is not None:
                self.on_window_done(step, self.report.steps, k, windows)
            return denoised

        return blend_windows(x, self._plan, predict, blend_weights(self._plan, crossfade=step > 0),
                             compute_device=device, first_window=first_window, blended=blended,
                             after_window=lambda k, partial: self._session.after_window(step, k, x, partial))

    def _window_prediction(self, k: int, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                           step: int) -> torch.Tensor:
        if self.alp is None:
            return self.guided_window(k, x, timestep, model_options)
        state = self._states[k]
        move_window_state(state, x.device)  # from the storage device, or a restored checkpoint
        probe = BlockProbe(self._blocks)

        def guided_velocity(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            denoised = self.guided_window(k, latents, timestep, model_options, probe)
            return (latents - denoised) / timestep.reshape(-1, *([1] * (latents.ndim - 1))).to(latents)

        def block_changes() -> list[float] | None:
            current = [probe.outputs[i] for i in self._blocks if i in probe.outputs]
            previous, self._previous_outputs[k] = self._previous_outputs[k], current
            if previous is None or len(current) < 2 or len(previous) != len(current):
                return None
            return block_change_magnitudes(previous, current)

        x_next, _ = alp_step(state, x, step, guided_velocity, block_changes)
        move_window_state(state, latent_storage_device(self.model_patcher.load_device, self._plan))
        sigma, sigma_next = float(self._sigmas[step]), float(self._sigmas[step + 1])
        velocity = (x_next - x) / (sigma_next - sigma)  # the velocity that moves the window where ALP put it
        return x - sigma * velocity

    def guided_window(self, k: int, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                      probe: BlockProbe | None = None) -> torch.Tensor:
        """The published guidance passes of window ``k`` at one noise level, combined (denoised latents)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        start, end = self._plan.windows[k]
        tokens = self.emotion.window_tokens(start, end, device=x.device).unsqueeze(0)
        options = dict(model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        ip_scales = tuple(self.emotion.ip_scale if PASSES[name].emotion else 0.0 for name in self.passes)
        transformer_options[EMOTION_OPTIONS_KEY] = EmotionPass(tokens, ip_scales)
        if probe is not None:
            transformer_options[BLOCK_PROBE_KEY] = probe
        options["transformer_options"] = transformer_options
        conds = [self.conds["negative" if PASSES[name].negative_prompt else "positive"] for name in self.passes]
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        self.report.model_passes[k] += len(self.passes)
        return combine_guidance(dict(zip(self.passes, outputs)), self.emotion.emo_cfg, self.emotion.text_cfg)

    # -- state the resume checkpoints carry ------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {"model_passes": list(self.report.model_passes),
                "previous_block_outputs": [list(p) if p is not None else None for p in self._previous_outputs]}

    def restore_checkpoint_state(self, saved: dict) -> None:
        self.report.model_passes[:] = saved["model_passes"]
        self._previous_outputs = list(saved["previous_block_outputs"])


def empty_video_latent(emotion: EmotionConditioning, reference_image: torch.Tensor, max_side: int) -> torch.Tensor:
    """Zero latents [1, 16, L, h, w] for the driving video's L latent frames at the reference's published size."""
    height, width = generation_size(reference_image.shape[1], reference_image.shape[2], max_side)
    return torch.zeros((1, 16, emotion.num_latent_frames, height // 8, width // 8))


def build_guider(model, positive: list, negative: list, clip_vision_output, vae, reference_image: torch.Tensor,
                 emotion: EmotionConditioning, windows, alp: ALPConfig | None,
                 resume: ResumePolicy) -> FlashPortraitGuider:
    """The guider both FlashPortrait nodes sample with, after the inputs are checked."""
    check_sampler_inputs(reference_image, emotion.window_tokens(0, 1), positive[0][0], negative[0][0],
                         getattr(clip_vision_output, "penultimate_hidden_states", None))
    guider = FlashPortraitGuider(model, vae, reference_image, clip_vision_output, emotion, windows.length,
                                 windows.overlap, alp, resume)
    guider.set_conds(positive, negative)
    return guider


def _prompt_server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except (ImportError, AttributeError):
        return None


def send_report(node_id: str, report: SamplingReport) -> None:
    """Show a run's report on the FlashPortrait Guider node (SamplerCustomAdvanced returns latents only)."""
    server = _prompt_server()
    if server is not None:
        from .report_ui import sampler_ui
        ui = sampler_ui(report, report.text())
        server.send_sync("flashportrait.report", {"node": node_id, "output": ui}, server.client_id)


def progress_reporter(node_id: str | None):
    """A per-window progress line shown on the node (ComfyUI's progress text), or None outside a server."""
    server = _prompt_server()
    if node_id is None or server is None:
        return None

    def report(step: int, steps: int, window: int, windows: int) -> None:
        server.send_progress_text(f"step {step + 1}/{steps} · window {window + 1}/{windows}", node_id)

    return report
