"""FlashPortrait in ComfyUI's custom sampling: a GUIDER for SamplerCustomAdvanced, and the published SIGMAS."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..flashportrait_core.sampling.alp import PRESETS, config_for_speedup, preset
from ..flashportrait_core.sampling.choice import MAX_TARGET_SPEEDUP, check_sampling_widgets
from ..flashportrait_core.sampling.schedules import DISTILLED_4STEP, PUBLISHED, SCHEDULES, sampling_sigmas
from . import resume_store
from .devices import devices_input
from .guider import build_guider, empty_video_latent, progress_reporter
from .sampler import SCHEDULE_TOOLTIP, guider_inputs, max_side_input, resume_input
from .widget_checks import widget_problem


class FlashPortraitGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitGuider",
            display_name="FlashPortrait Guider",
            category="FlashPortrait",
            description="The published FlashPortrait guidance over sliding windows as a GUIDER: SamplerCustomAdvanced "
                        "runs it with any NOISE, SAMPLER (KSamplerSelect) and SIGMAS (FlashPortrait Schedule for "
                        "the published grid, or ComfyUI's schedulers). Also gives the empty latent of the right "
                        "size and length. With euler and FlashPortrait Schedule it equals FlashPortrait Sampler.",
            inputs=[
                *guider_inputs(),
                max_side_input(),
                io.Combo.Input("acceleration", options=list(PRESETS), default="off",
                               tooltip="off: every step computed, as published. quality / balanced / fast: "
                                       "Adaptive Latent Prediction (this pack's reconstruction), ~3x / 4x / 6x "
                                       "fewer DiT passes; needs the euler sampler (KSamplerSelect euler)."),
                io.Float.Input("target_speedup", default=0.0, min=0.0, max=MAX_TARGET_SPEEDUP, step=0.5,
                               tooltip="Optional, with an ALP preset only: a target speed-up instead of the "
                                       "preset's; 0 uses the preset."),
                resume_input(),
                devices_input(),
            ],
            outputs=[
                io.Guider.Output(display_name="guider"),
                io.Latent.Output(display_name="latent", tooltip="Empty latents for the driving video's length at "
                                                                "the reference's size (max_side)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, acceleration: str = "off", target_speedup: float = 0.0,
                        resume: str = resume_store.OFF) -> bool | str:
        problem = widget_problem(cls, acceleration=acceleration, target_speedup=target_speedup, resume=resume)
        if problem:
            return problem
        try:
            check_sampling_widgets(acceleration, "euler", target_speedup, PUBLISHED)
            resume_store.ResumePolicy.from_choice(resume)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, positive, negative, clip_vision_output, vae, reference_image: torch.Tensor, emotion,
                windows, max_side: int, acceleration: str = "off", target_speedup: float = 0.0,
                resume: str = resume_store.OFF, devices=None) -> io.NodeOutput:
        alp = config_for_speedup(target_speedup) if target_speedup else preset(acceleration)
        guider = build_guider(model, positive, negative, clip_vision_output, vae, reference_image, emotion, windows,
                              alp, resume_store.ResumePolicy.from_choice(resume), devices)
        guider.report_node_id = getattr(cls.hidden, "unique_id", None)
        guider.on_window_done = progress_reporter(getattr(cls.hidden, "unique_id", None))
        return io.NodeOutput(guider, {"samples": empty_video_latent(emotion, reference_image, max_side)})


class FlashPortraitSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashPortraitSchedule",
            display_name="FlashPortrait Schedule",
            category="FlashPortrait",
            description="Noise levels (SIGMAS) for SamplerCustomAdvanced: the published grid by default.",
            inputs=[
                io.Combo.Input("schedule", options=list(SCHEDULES), default=PUBLISHED,
                               tooltip=SCHEDULE_TOOLTIP + f" {DISTILLED_4STEP}: the 4-step LoRA's timesteps "
                                                          f"1000/750/500/250 (steps not used)."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Steps (published: 30)."),
                io.Float.Input("shift", default=5.0, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching shift (published: 5)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run (below 1: refine a given latent), as "
                                       "ComfyUI's BasicScheduler."),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, schedule: str, steps: int, shift: float, denoise: float = 1.0) -> io.NodeOutput:
        return io.NodeOutput(sampling_sigmas(schedule, steps, shift, denoise).float())
