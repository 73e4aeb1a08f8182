"""One window's guided prediction at one noise level: the code the guider runs in ComfyUI's process and every
device worker runs in its own (window-parallel sampling), so both paths give the same numbers.

Each window is conditioned as published (the reference at its local frame 0, the CLIP context of the reference, its
own emotion tokens) and evaluated with the published guidance passes through ComfyUI's ``calc_cond_batch`` (hooks,
timestep-ranged and combined conditioning, model wrappers and LoRAs apply); with Adaptive Latent Prediction a
skipped step's prediction is forecast from the window's own history instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.model_management
import comfy.samplers
import torch

from ..flashportrait_core.sampling.alp import ALPConfig, ALPWindowState, alp_step, block_change_magnitudes
from ..flashportrait_core.sampling.guidance import PASSES, combine_guidance
from ..flashportrait_core.sampling.resume import move_window_state
from ..flashportrait_core.sampling.windows import WindowPlan
from .wan_patch import BLOCK_PROBE_KEY, EMOTION_OPTIONS_KEY, BlockProbe, EmotionPass
from .wan_runner import latent_storage_device

# (window, device) -> that window's emotion tokens [1, L, M, D] on the device
WindowTokens = Callable[[int, torch.device], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """The published guidance of a run: which passes, their scales, the emotion strength."""

    passes: tuple[str, ...]
    emo_cfg: float
    text_cfg: float
    ip_scale: float


def window_conds(inner_model, conds: dict, concat: tuple[torch.Tensor, torch.Tensor], window_shape: tuple,
                 dtype: torch.dtype, device: torch.device, seed: int | None) -> dict:
    """The model's conditions for one window, from the run's conditions and the reference condition.

    Made for one window: every window has the same image-to-video condition, which made for the whole video
    would be a zero tensor as long as the video on the accelerator.
    """
    window_noise = torch.zeros(window_shape, dtype=dtype, device=device)
    concat_latent, concat_mask = concat
    conds = {name: [dict(entry, concat_latent_image=concat_latent, concat_mask=concat_mask) for entry in entries]
             for name, entries in conds.items()}
    return comfy.samplers.process_conds(inner_model, window_noise, conds, device, seed=seed)


class WindowEvaluator:
    """Evaluates windows of one run. ``states``, ``previous_outputs`` and ``model_passes`` are per window (shared
    with the caller's report and resume checkpoints); a worker keeps those of its own windows."""

    def __init__(self, inner_model, conds: dict, guidance: Guidance, tokens: WindowTokens, plan: WindowPlan,
                 sigmas: torch.Tensor, alp: ALPConfig | None, blocks: tuple[int, ...], load_device: torch.device,
                 states: list[ALPWindowState], previous_outputs: list, model_passes: list[int]):
        self.inner_model, self.conds, self.guidance, self.tokens = inner_model, conds, guidance, tokens
        self.plan, self.sigmas, self.alp, self.blocks = plan, sigmas, alp, blocks
        self.load_device = load_device
        self.states, self.previous_outputs, self.model_passes = states, previous_outputs, model_passes

    def predict(self, k: int, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                step: int) -> torch.Tensor:
        """Window ``k``'s guided denoised prediction at schedule step ``step`` (ALP's forecast at a skipped step)."""
        if self.alp is None:
            return self.guided_window(k, x, timestep, model_options)
        state = self.states[k]
        move_window_state(state, x.device)  # from the storage device, or a restored checkpoint
        probe = BlockProbe(self.blocks)

        def guided_velocity(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            denoised = self.guided_window(k, latents, timestep, model_options, probe)
            return (latents - denoised) / timestep.reshape(-1, *([1] * (latents.ndim - 1))).to(latents)

        def block_changes() -> list[float] | None:
            current = [probe.outputs[i] for i in self.blocks if i in probe.outputs]
            previous, self.previous_outputs[k] = self.previous_outputs[k], current
            if previous is None or len(current) < 2 or len(previous) != len(current):
                return None
            return block_change_magnitudes(previous, current)

        x_next, _ = alp_step(state, x, step, guided_velocity, block_changes)
        move_window_state(state, latent_storage_device(self.load_device, self.plan))
        sigma, sigma_next = float(self.sigmas[step]), float(self.sigmas[step + 1])
        velocity = (x_next - x) / (sigma_next - sigma)  # the velocity that moves the window where ALP put it
        return x - sigma * velocity

    def guided_window(self, k: int, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                      probe: BlockProbe | None = None) -> torch.Tensor:
        """The published guidance passes of window ``k`` at one noise level, combined (denoised latents)."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        guidance = self.guidance
        options = dict(model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        ip_scales = tuple(guidance.ip_scale if PASSES[name].emotion else 0.0 for name in guidance.passes)
        transformer_options[EMOTION_OPTIONS_KEY] = EmotionPass(self.tokens(k, x.device), ip_scales)
        if probe is not None:
            transformer_options[BLOCK_PROBE_KEY] = probe
        options["transformer_options"] = transformer_options
        conds = [self.conds["negative" if PASSES[name].negative_prompt else "positive"] for name in guidance.passes]
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        self.model_passes[k] += len(guidance.passes)
        return combine_guidance(dict(zip(guidance.passes, outputs)), guidance.emo_cfg, guidance.text_cfg)
