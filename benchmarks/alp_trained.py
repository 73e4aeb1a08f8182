"""ALP on a trained video DiT, against same-budget baselines, in the sampler's own windowed loop.

The testbed (``trained_dit.py``: data, split by video, model, training budget; all fixed before ALP was
measured on it) is ComfyUI's WanModel at width 64, trained here on 32x32 clips of real faces with a first-frame
(I2V) condition. The run trains it if it is not cached yet, tunes what is tunable on the tuning clips if that is
not cached yet, then measures everything on the report clips, which come from other videos.

The evaluation, per clip: 12 frames (every 2nd video frame), two context windows of 8 latent frames overlapping
by 4, blended by the sampler's loop (``sample_flow_windows``, cross-fade after the first step). Every window is
conditioned on the clip's first real frame, as the pack conditions every window on the reference. The guided
velocity, uncond + 2 (cond - uncond) with the first frame dropped for uncond, is combined before anything
reuses or forecasts it, so one evaluation = both passes of one window at one step. Noise is seeded per clip.

- Full: 30 Euler steps on the published grid (shift 5), every step computed.
- Converged: Adams-3 over 120 steps of the simple shift-5 grid (the ODE to sigma 0); its distance to 240 steps
  is printed.
- Budgets 5, 6, 8, 10 evaluations per window (of 30). Baselines: Euler, Adams-2/3 (the pack's solvers) and
  ComfyUI's multistep samplers on their own N-step published grid; zeroth-order reuse at fixed steps and with
  TeaCache's and MagCache's rules; TaylorSeer-like first/second-order forecasts at fixed steps; ComfyUI's
  EasyCache rule. ALP as the pack's guider runs it (``WindowALP``: the pack's per-window ``alp_step``, the layer
  dial fed by the pack's ``BlockProbe`` on the real blocks), with the shipped settings for speed-up 30/N; also with the
  layer dial off (or on, when shipped off).
- Measures: PSNR against full and against converged, SSIM against full, temporal PSNR (of frame-to-frame
  differences) against full; mean over the report clips.

Tuning (tuning clips only: one clip of each tuning video, so 2; cached as ``tuning.json`` next to the model;
``--retune`` redoes it): the baselines' thresholds and step placements, MagCache's magnitude ratios (from the
full runs), the ALP grid per budget and the layer dial's limit. The ALP rows of the report use the settings
shipped in ``flashportrait_core/sampling/alp.py``; the tuning run prints the anchors it found so they can be
shipped.

    python benchmarks/alp_trained.py                 # the table, the plot, memory; trains/tunes when not cached
    python benchmarks/alp_trained.py --retune        # redo the tuning
    python benchmarks/alp_trained.py --tune-budgets 5,10 [--report-part] &   # in two processes (two cores);
    python benchmarks/alp_trained.py --tune-budgets 6,8 [--report-part]      # once the first has references
    python benchmarks/alp_trained.py --write-docs    # also copy the loss and quality plots to docs/
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks", REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import trained_dit as td  # noqa: E402

td.use_host()  # before anything imports comfy

from pack import PACK_NAME, import_pack  # noqa: E402
from video_metrics import mean_and_spread, psnr, ssim, temporal_psnr  # noqa: E402
from tuning_parts import merge_part_files, parse_budgets, part_name  # noqa: E402
from window_caches import (EasyCacheRule, FixedPlanCache, MagCacheLike, TeaCacheLike, WindowedDenoiser,  # noqa: E402
                           spread_plan)

import_pack()
alp = importlib.import_module(f"{PACK_NAME}.flashportrait_core.sampling.alp")
guidance = importlib.import_module(f"{PACK_NAME}.flashportrait_core.sampling.guidance")
loop = importlib.import_module(f"{PACK_NAME}.flashportrait_core.sampling.loop")
schedules = importlib.import_module(f"{PACK_NAME}.flashportrait_core.sampling.schedules")
windows = importlib.import_module(f"{PACK_NAME}.flashportrait_core.sampling.windows")
guider = importlib.import_module(f"{PACK_NAME}.nodes.guider")
wan_patch = importlib.import_module(f"{PACK_NAME}.nodes.wan_patch")

import comfy.k_diffusion.sampling as kds  # noqa: E402
from comfy.extra_samplers import uni_pc  # noqa: E402
from comfy.ldm.wan.model import sinusoidal_embedding_1d  # noqa: E402

EVAL_FRAMES = 12
WINDOW, OVERLAP = 8, 4
PLAN = windows.plan_windows(EVAL_FRAMES, WINDOW, OVERLAP)
FULL_STEPS = 30
SHIFT = 5.0
CONVERGED_STEPS = 120
BUDGETS = (5, 6, 8, 10)
# ALP's target speed-up at each budget (the speed-up caps computed steps at ceil(30 / speed-up) per window): the
# presets' 3x (quality), 4x (balanced), 6x (fast), and 5x.
ALP_SPEEDUP_AT_BUDGET = {5: 6.0, 6: 5.0, 8: 4.0, 10: 3.0}
SPEEDUPS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
PRESET_NAMES = ("quality", "balanced", "fast")
# Clips per video: 1 per tuning video (2 clips), 2 per report video (4 clips). Fixed for the CPU time before any
# result on the trained model (planned: 4 and 6): at 0.12 s of CPU a guided pass, the planned grids cost ~70
# CPU-min, and the shared 2-core machine gave these runs a quarter of a core each.
TUNING_PER_VIDEO, REPORT_PER_VIDEO = 1, 2
COMFY_SAMPLERS: dict[str, Callable] = {
    "ipndm": kds.sample_ipndm,
    "deis": kds.sample_deis,
    "res_multistep": kds.sample_res_multistep,
    "dpmpp_2m": kds.sample_dpmpp_2m,
    "uni_pc": uni_pc.sample_unipc,
}
OUR_SOLVERS = ("adams2", "adams3")
LOOP_SOLVERS = ("euler",) + OUR_SOLVERS  # the pack's window loop
# A solver's "own grid": each of the two schedules the pack offers, at N steps (both are baselines).
# (ComfyUI's simple grid, the pack's other schedule, was planned as a second grid per solver; cut for CPU time with
# the clip counts above.)
GRIDS = {"published": lambda n: schedules.published_sigmas(n, SHIFT)}
DIAL_OFF = math.inf  # layer_ratio_limit that never damps nor drops an order
DIAL_ON_REFERENCE = 1.5  # the limit the closed-form testbed shipped


def published(steps: int) -> torch.Tensor:
    return schedules.published_sigmas(steps, SHIFT)


# --------------------------------------------------------------------------------------------------
# The guided velocity of one clip (the role GuidedWanVelocity plays in the pack)
# --------------------------------------------------------------------------------------------------

class ProbedBlock:
    """The host's per-block replacement hook as the pack's EmotionBlockPatch uses it: run the block unchanged and
    hand the conditioned pass's rows of its output to the pass's BlockProbe (what ALP's layer dial reads)."""

    def __init__(self, index: int, rows: int):
        self.index, self.rows = index, rows

    def __call__(self, args: dict, extra: dict) -> dict:
        out = extra["original_block"](args)
        probe = args["transformer_options"].get(wan_patch.BLOCK_PROBE_KEY)
        if probe is not None:
            probe.record(self.index, out["img"][: self.rows])
        return out


class GuidedFaceVelocity:
    """Both passes of one evaluation in one batch (cond rows, then the dropped-condition rows), combined with the
    pack's ``combine_guidance`` (cond as "posi", dropped as "no_emo", text_cfg 1)."""

    def __init__(self, model: torch.nn.Module, reference: torch.Tensor, plan=PLAN, scale: float = td.GUIDANCE):
        self.model, self.plan, self.scale = model, plan, scale
        rows = reference.shape[0]
        self.references = torch.cat([reference, reference])
        self.keep = torch.cat([torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)])
        self.patches = {"dit": {("double_block", i): ProbedBlock(i, rows) for i in range(len(model.blocks))}}
        self.report = SimpleNamespace(alp_states=[])  # WindowALP hands its window states over here
        self.progress = None
        self.evaluations = [0] * len(plan.windows)
        self.last_posi: torch.Tensor | None = None

    def guided(self, x: torch.Tensor, sigma: float, window: int, probe=None) -> torch.Tensor:
        options = {}
        if probe is not None:
            options = {"patches_replace": self.patches, wan_patch.BLOCK_PROBE_KEY: probe}
        with torch.no_grad():
            v = td.model_velocity(self.model, torch.cat([x, x]), float(sigma), self.references, self.keep, options)
        posi, uncond = v.chunk(2)
        self.last_posi = posi
        self.evaluations[window] += 1
        return guidance.combine_guidance({"posi": posi, "no_emo": uncond}, self.scale, 1.0)

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        return self.guided(x, sigma, window)


@dataclass
class Clip:
    video: str
    start: int
    reference: torch.Tensor  # [1, 3, H, W]
    noise: torch.Tensor  # [1, 3, EVAL_FRAMES, H, W]
    real: torch.Tensor  # the real clip [1, 3, EVAL_FRAMES, H, W] (only shown, never scored)


def make_clips(frames, role: str, per_video: int, seed_base: int) -> list[Clip]:
    clips = []
    for k, (video, start) in enumerate(td.evaluation_clips(frames, role, per_video, EVAL_FRAMES)):
        real = td.clip_tensor(frames, [(video, start)], EVAL_FRAMES)
        noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed_base + k))
        clips.append(Clip(video, start, real[:, :, 0], noise, real))
    return clips


# --------------------------------------------------------------------------------------------------
# Running a method on a clip
# --------------------------------------------------------------------------------------------------

Runner = Callable[[Clip], tuple[torch.Tensor, list[int]]]


def loop_runner(model, sigmas: torch.Tensor, make_velocity=None, solver: str = "euler") -> Runner:
    """The pack's window loop over ``sigmas``; ``make_velocity(guided)`` wraps the guided velocity (a cache, ALP)."""

    def run(clip: Clip):
        guided = GuidedFaceVelocity(model, clip.reference)
        velocity = guided if make_velocity is None else make_velocity(guided)
        x = loop.sample_flow_windows(clip.noise, sigmas, PLAN, velocity, solver=solver)
        return x, guided.evaluations

    return run


def ksampler_runner(model, sampler: Callable, sigmas: torch.Tensor) -> Runner:
    """A ComfyUI sampler function over the windows (the windowed denoiser), on ``sigmas``."""

    def run(clip: Clip):
        guided = GuidedFaceVelocity(model, clip.reference)
        denoiser = WindowedDenoiser(guided, PLAN)
        with torch.no_grad():
            x = sampler(denoiser, clip.noise.clone(), sigmas.float(), extra_args={}, disable=True)
        return x, guided.evaluations

    return run


def solver_runner(model, solver: str, sigmas: torch.Tensor) -> Runner:
    if solver in LOOP_SOLVERS:
        return loop_runner(model, sigmas, solver=solver)
    return ksampler_runner(model, COMFY_SAMPLERS[solver], sigmas)


def solver_label(solver: str) -> str:
    if solver == "euler":
        return "Euler"
    return f"{solver} ({'pack' if solver in LOOP_SOLVERS else 'ComfyUI'})"


class WindowALP:
    """ALP as ``FlashPortraitGuider._window_prediction`` runs it, as a window velocity of the pack's loop.

    Each window keeps its own state; at a computed step the probed blocks (``probe_blocks``: up to six spread
    from first to last) hand a strided sample of their outputs to a ``BlockProbe``, whose change since the
    window's previous computed step feeds the layer dial. The guider turns ALP's step back into a denoised
    prediction for ComfyUI's Euler sampler; the loop blends velocities, so here it becomes the velocity that moves
    the window to the same place (the same latent: the Euler step is linear in either).
    """

    def __init__(self, guided: GuidedFaceVelocity, sigmas: torch.Tensor, config, num_blocks: int):
        self.guided = guided
        self.states = [alp.new_window_state(sigmas, config) for _ in guided.plan.windows]
        guided.report.alp_states = self.states
        self.blocks = guider.probe_blocks(num_blocks)
        self.previous_outputs: list[list[torch.Tensor] | None] = [None] * len(self.states)

    def __call__(self, x: torch.Tensor, sigma: float, window: int, step: int) -> torch.Tensor:
        state = self.states[window]
        probe = wan_patch.BlockProbe(self.blocks)

        def block_changes() -> list[float] | None:
            current = [probe.outputs[i] for i in self.blocks if i in probe.outputs]
            previous, self.previous_outputs[window] = self.previous_outputs[window], current
            if previous is None or len(current) < 2 or len(previous) != len(current):
                return None
            return alp.block_change_magnitudes(previous, current)

        x_next, _ = alp.alp_step(state, x, step, lambda latents, s: self.guided.guided(latents, s, window, probe),
                                 block_changes)
        return (x_next - x) / (state.sigmas[step + 1] - state.sigmas[step])


def alp_runner(model, config) -> Runner:
    sigmas = published(FULL_STEPS)
    return loop_runner(model, sigmas, lambda guided: WindowALP(guided, sigmas, config, len(model.blocks)))


def timestep_embedding(model) -> Callable[[float], torch.Tensor]:
    """sigma -> the time_projection output the blocks are modulated with (what TeaCache's Wan port measures)."""

    def embed(sigma: float) -> torch.Tensor:
        with torch.no_grad():
            t = torch.tensor([sigma * 1000.0])
            e = model.time_embedding(sinusoidal_embedding_1d(model.freq_dim, t))
            return model.time_projection(e)

    return embed


@dataclass
class Result:
    vs_full: float
    vs_converged: float
    ssim_full: float
    ssim_converged: float
    temporal_full: float
    evals_mean: float
    evals_max: int
    vs_full_sd: float = 0.0  # spread over clips


class References:
    """Full and converged samples per clip (computed once, kept in ``path`` when given)."""

    def __init__(self, model, clips: list[Clip], path: Path | None = None):
        key = ";".join(f"{c.video}@{c.start}" for c in clips) + f"|{FULL_STEPS}|{CONVERGED_STEPS}"
        if path is not None and path.is_file():
            saved = torch.load(path)
            if saved["key"] == key:
                self.full, self.converged = saved["full"], saved["converged"]
                return
        full = loop_runner(model, published(FULL_STEPS))
        converged = loop_runner(model, schedules.simple_sigmas(CONVERGED_STEPS, SHIFT), solver="adams3")
        self.full = [full(c)[0] for c in clips]
        self.converged = [converged(c)[0] for c in clips]
        if path is not None:  # written whole, then renamed: another process may be waiting to read it
            partial = path.with_suffix(".partial")
            torch.save({"key": key, "full": self.full, "converged": self.converged}, partial)
            partial.replace(path)


def score(runner: Runner, clips: list[Clip], refs: References, keep_samples: bool = False
          ) -> tuple[Result, list[Result], list[torch.Tensor]]:
    per_clip, samples = [], []
    for clip, full, converged in zip(clips, refs.full, refs.converged):
        x, evaluations = runner(clip)
        per_clip.append(Result(psnr(x, full), psnr(x, converged), ssim(x, full), ssim(x, converged),
                               temporal_psnr(x, full), sum(evaluations) / len(evaluations), max(evaluations)))
        if keep_samples:
            samples.append(x)
    mean = Result(*[sum(getattr(r, f) for r in per_clip) / len(per_clip) for f in
                    ("vs_full", "vs_converged", "ssim_full", "ssim_converged", "temporal_full", "evals_mean")],
                  max(r.evals_max for r in per_clip), mean_and_spread([r.vs_full for r in per_clip])[1])
    return mean, per_clip, samples


# --------------------------------------------------------------------------------------------------
# Tuning (tuning clips only)
# --------------------------------------------------------------------------------------------------

EASYCACHE_THRESHOLDS = (0.03, 0.08, 0.2, 0.5)
EASYCACHE_STARTS = (0.0, 0.15)  # the node's defaults: start 0.15, end 0.95
EASYCACHE_ENDS = (0.95,)  # the node's default end
TEACACHE_THRESHOLDS = tuple(float(t) for t in torch.logspace(math.log10(0.005), math.log10(2.0), 10))
MAGCACHE_THRESHOLDS = (0.03, 0.1, 0.3, 0.8)
MAGCACHE_SKIPS = (2, 4)
MAGCACHE_RETENTION = (0.1, 0.2)
# ALP: a grid at pace 0, then pace 0.5 for the best ALP_PACED of it, then the layer dial's limit for the best.
ALP_SPACE = dict(max_order=(1, 2), first_trust=(0.03, 0.1), error_tolerance=(0.005, 0.02, 0.08))
ALP_PACES = (0.0, 0.5)
ALP_PACED = 2
DIAL_LIMITS = (DIAL_ON_REFERENCE, DIAL_OFF)


class _NullGuided:
    """Stands in for the model where a rule's decisions do not depend on the values (TeaCache, MagCache)."""

    def __init__(self):
        self.plan, self.evaluations, self.last_posi = PLAN, [0] * len(PLAN.windows), None

    def guided(self, x, sigma, window, probe=None):
        self.evaluations[window] += 1
        return torch.zeros_like(x)


def computed_plan(make_cache, sigmas) -> tuple[tuple[int, ...], ...]:
    """The steps a value-independent rule computes, per window (run on zeros, no model)."""
    cache = make_cache(_NullGuided())
    loop.sample_flow_windows(torch.zeros(1, 3, EVAL_FRAMES, 4, 4), sigmas, PLAN, cache)
    return tuple(tuple(c) for c in cache.computed)


def magnitude_ratios(model, clips: list[Clip]) -> list[float]:
    """Mean |v_i| / |v_{i-1}| per step of the full run over the clips and windows (MagCache's calibration)."""
    sigmas = published(FULL_STEPS)
    sums = [0.0] * FULL_STEPS
    count = 0
    for clip in clips:
        norms: dict[int, list[float]] = {}
        guided = GuidedFaceVelocity(model, clip.reference)

        def recording(x, sigma, window, step, guided=guided, norms=norms):
            v = guided.guided(x, sigma, window)
            norms.setdefault(window, []).append(float(v.norm()))
            return v

        loop.sample_flow_windows(clip.noise, sigmas, PLAN, recording)
        for series in norms.values():
            count += 1
            for i in range(1, FULL_STEPS):
                sums[i] += series[i] / series[i - 1]
    return [1.0] + [s / count for s in sums[1:]]


def tune(model, clips: list[Clip], refs: References, log: Callable[[str], None],
         budgets: tuple[int, ...] = BUDGETS) -> dict:
    sigmas = published(FULL_STEPS)
    embed = timestep_embedding(model)
    tuned: dict = {"budgets": {}, "alp": {}, "alp_top": {}, "dial": {}}
    started = time.time()
    tuned["mag_ratios"] = ratios = magnitude_ratios(model, clips)
    log(f"magnitude ratios: {' '.join(f'{r:.3f}' for r in ratios[1:])}")

    def best(candidates: dict, label: str):
        scored = {key: score(run, clips, refs)[0].vs_full for key, run in candidates.items()}
        choice = max(scored, key=scored.get)
        log(f"  {label}: best {choice} {scored[choice]:.2f} dB of {len(scored)}")
        return choice, scored[choice]

    for budget in budgets:
        log(f"budget {budget} ({time.time() - started:.0f} s, {time.process_time() / 60:.0f} CPU-min)")
        chosen: dict = {}
        for order, name in ((0, "reuse"), (1, "taylor1"), (2, "taylor2")):
            plans = {}
            for warmup, final in itertools.product((1, 2), (True, False)):
                plan = spread_plan(FULL_STEPS, budget, warmup, final)
                if len(plan) == budget and plan not in plans.values():
                    plans[(warmup, final)] = plan
            candidates = {key: loop_runner(model, sigmas, lambda g, p=plan, o=order: FixedPlanCache(g, sigmas, p, o))
                          for key, plan in plans.items()}
            chosen[name] = list(best(candidates, name)[0])
        unique: dict = {}
        for threshold in TEACACHE_THRESHOLDS:
            make = lambda g, t=threshold: TeaCacheLike(g, sigmas, budget, t, embed)  # noqa: E731
            unique.setdefault(computed_plan(make, sigmas), (threshold, make))
        candidates = {t: loop_runner(model, sigmas, make) for t, make in unique.values()}
        chosen["teacache"] = best(candidates, "TeaCache-like")[0]
        unique = {}
        for threshold, skips, retention in itertools.product(MAGCACHE_THRESHOLDS, MAGCACHE_SKIPS, MAGCACHE_RETENTION):
            make = lambda g, t=threshold, k=skips, r=retention: MagCacheLike(g, sigmas, budget, t, ratios, k, r)  # noqa: E731
            try:
                unique.setdefault(computed_plan(make, sigmas), ((threshold, skips, retention), make))
            except ValueError:  # the retained steps alone exceed the budget
                continue
        candidates = {key: loop_runner(model, sigmas, make) for key, make in unique.values()}
        chosen["magcache"] = list(best(candidates, "MagCache-like")[0])
        candidates = {}
        for threshold, start, end in itertools.product(EASYCACHE_THRESHOLDS, EASYCACHE_STARTS, EASYCACHE_ENDS):
            make = lambda g, t=threshold, s=start, e=end: EasyCacheRule(  # noqa: E731
                g, sigmas, budget, t, start_percent=s, end_percent=e)
            try:
                make(_NullGuided())
            except ValueError:  # the always-computed steps alone exceed the budget
                continue
            candidates[(threshold, start, end)] = loop_runner(model, sigmas, make)
        chosen["easycache"] = list(best(candidates, "EasyCache")[0])
        tuned["budgets"][str(budget)] = chosen

        results = []

        def try_alp(settings: dict) -> None:
            config = alp.ALPConfig(speedup=ALP_SPEEDUP_AT_BUDGET[budget], **settings)
            result = score(alp_runner(model, config), clips, refs)[0]
            results.append((result.vs_full, result.vs_converged, result.evals_mean, settings))

        for values in itertools.product(*ALP_SPACE.values()):
            try_alp(dict(zip(ALP_SPACE, values), pace=ALP_PACES[0]))
        results.sort(key=lambda r: -r[0])
        for pace in ALP_PACES[1:]:
            for _, _, _, settings in results[:ALP_PACED]:
                try_alp(dict(settings, pace=pace))
        results.sort(key=lambda r: -r[0])
        for vs_full, vs_conv, evals, settings in results[:5]:
            log(f"  ALP {vs_full:6.2f} / {vs_conv:6.2f} dB, {evals:.2f} evals  {settings}")
        tuned["alp"][str(budget)] = results[0][3]
        tuned["alp_top"][str(budget)] = results[:5]
        dial = {str(alp.ALPConfig.layer_ratio_limit): results[0][0]}  # the grid ran at the default limit
        for limit in (limit for limit in DIAL_LIMITS if str(limit) not in dial):
            config = alp.ALPConfig(speedup=ALP_SPEEDUP_AT_BUDGET[budget], layer_ratio_limit=limit, **results[0][3])
            dial[str(limit)] = score(alp_runner(model, config), clips, refs)[0].vs_full
        log(f"  layer dial limit -> dB: {dial}")
        tuned["dial"][str(budget)] = dial
    tuned["seconds"] = time.time() - started
    return tuned


def suggested_anchors(tuned: dict) -> list[str]:
    lines = []
    for budget in sorted(BUDGETS, reverse=True):
        s = tuned["alp"][str(budget)]
        lines.append(f"    ({ALP_SPEEDUP_AT_BUDGET[budget]:g}, {s['max_order']}, {s['first_trust']:g}, "
                     f"{s['error_tolerance']:g}, {s['pace']:g}),  # {budget} of {FULL_STEPS}")
    return lines


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

@dataclass
class Row:
    budget: int | None
    name: str
    family: str  # solver, cache, alp
    settings: str
    result: Result
    per_clip: list[Result]


def report_methods(model, budget: int, tuned: dict) -> list[tuple[str, str, str, Runner]]:
    """(name, family, settings, runner) of every method at ``budget`` evaluations per window."""
    sigmas = published(FULL_STEPS)
    chosen = tuned["budgets"][str(budget)]
    embed = timestep_embedding(model)
    methods = []
    for solver in LOOP_SOLVERS + tuple(COMFY_SAMPLERS):
        for grid, make in GRIDS.items():
            methods.append((f"{solver_label(solver)}, {grid} grid", "solver", f"{budget} steps",
                            solver_runner(model, solver, make(budget))))
    for key, label, order in (("reuse", "Reuse, fixed steps", 0), ("taylor1", "Taylor-1 (TaylorSeer-like)", 1),
                              ("taylor2", "Taylor-2 (TaylorSeer-like)", 2)):
        warmup, final = chosen[key]
        plan = spread_plan(FULL_STEPS, budget, warmup, final)
        methods.append((label, "cache", f"steps {sorted(plan)}",
                        loop_runner(model, sigmas, lambda g, p=plan, o=order: FixedPlanCache(g, sigmas, p, o))))
    t = chosen["teacache"]
    methods.append(("Reuse, TeaCache-like rule", "cache", f"threshold {t:.3g}",
                    loop_runner(model, sigmas, lambda g: TeaCacheLike(g, sigmas, budget, t, embed))))
    mt, mk, mr = chosen["magcache"]
    ratios = tuned["mag_ratios"]
    methods.append(("Reuse, MagCache-like rule", "cache", f"threshold {mt:g}, K {mk}, retention {mr:g}",
                    loop_runner(model, sigmas, lambda g: MagCacheLike(g, sigmas, budget, mt, ratios, mk, mr))))
    et, es, ee = chosen["easycache"]
    methods.append(("EasyCache (ComfyUI rule)", "cache", f"threshold {et:g}, start {es:g}, end {ee:g}",
                    loop_runner(model, sigmas, lambda g: EasyCacheRule(g, sigmas, budget, et, start_percent=es,
                                                                       end_percent=ee))))
    shipped = alp.config_for_speedup(ALP_SPEEDUP_AT_BUDGET[budget])
    methods.append(("ALP", "alp", describe(shipped), alp_runner(model, shipped)))
    if math.isinf(shipped.layer_ratio_limit):  # shipped off: show it on at its former default
        label, other = f"ALP, layer dial on ({DIAL_ON_REFERENCE:g})", DIAL_ON_REFERENCE
    else:
        label, other = "ALP, layer dial off", DIAL_OFF
    # (The integration modes "euler" and "stale" were planned rows too; cut for CPU time with the clip counts.)
    for label, config in ((label, replace(shipped, layer_ratio_limit=other)),):
        methods.append((label, "alp", describe(config), alp_runner(model, config)))
    return methods


def describe(config) -> str:
    return (f"x{config.speedup:g}: order {config.max_order}, trust {config.first_trust:.3g}, tol "
            f"{config.error_tolerance:.3g}, pace {config.pace:.2g}, dial {config.layer_ratio_limit:g}, "
            f"warm-up {config.warmup_steps}, final {config.final_steps}, {config.integration}")


class ResultCache:
    """Scores of earlier report runs, keyed by method, settings and clips: a rerun after a preset change only
    runs what changed. ``--fresh`` ignores it. Scores of report parts (``also``: other processes' caches, for
    other budgets) are read too; new scores are written to ``path`` only."""

    def __init__(self, path: Path, clips: list[Clip], enabled: bool, also: tuple[Path, ...] = ()):
        self.path, self.enabled = path, enabled
        self.clips = ";".join(f"{c.video}@{c.start}" for c in clips)
        self.samples_path = path.with_suffix(".samples.pt")
        self.entries, self.samples = {}, {}
        for source in (*also, path) if enabled else ():
            if source.is_file():
                self.entries.update(json.loads(source.read_text()))
            if source.with_suffix(".samples.pt").is_file():
                self.samples.update(torch.load(source.with_suffix(".samples.pt")))

    def key(self, name: str, budget, settings: str) -> str:
        return f"{name}|{budget}|{settings}|{self.clips}"

    def score(self, name: str, budget, settings: str, runner: Runner, clips, refs, keep: bool):
        key = self.key(name, budget, settings)
        if key in self.entries and (not keep or key in self.samples):
            entry = self.entries[key]
            return Result(**entry["mean"]), [Result(**r) for r in entry["per_clip"]], self.samples.get(key, [])
        result, per_clip, kept = score(runner, clips, refs, keep_samples=keep)
        self.entries[key] = {"mean": asdict(result), "per_clip": [asdict(r) for r in per_clip]}
        self.path.write_text(json.dumps(self.entries))
        if keep:
            self.samples[key] = kept
            torch.save(self.samples, self.samples_path)
        return result, per_clip, kept


def format_row(row: Row) -> str:
    r = row.result
    budget = "" if row.budget is None else f"{row.budget}"
    return (f"{budget:>6}  {row.name:<42} {r.evals_mean:>5.2f}  {r.vs_full:>7.2f} {r.vs_full_sd:>4.1f}  "
            f"{r.vs_converged:>7.2f}  {r.ssim_full:>6.4f}  {r.ssim_converged:>6.4f}  {r.temporal_full:>7.2f}  "
            f"{row.settings}")


HEADER = (f"{'budget':>6}  {'method':<42} {'evals':>5}  {'vs full':>7} {'sd':>4}  {'vs conv':>7}  {'SSIM f':>6}  "
          f"{'SSIM c':>6}  {'tPSNR f':>7}  settings (PSNR in dB; f: against full, c: against converged)")


def print_bar(rows: list[Row], log) -> dict:
    """The bar: >= 30 dB vs full at 5 evaluations, and above every same-budget baseline vs full and converged."""
    verdict = {}
    log("bar (report clips): ALP vs the best same-budget baseline (vs full / vs converged)")
    for budget in BUDGETS:
        at = [r for r in rows if r.budget == budget]
        mine = next(r for r in at if r.name == "ALP")
        base = [r for r in at if r.family != "alp"]
        best_full = max(base, key=lambda r: r.result.vs_full)
        best_conv = max(base, key=lambda r: r.result.vs_converged)
        margins = (mine.result.vs_full - best_full.result.vs_full, mine.result.vs_converged - best_conv.result.vs_converged)
        verdict[budget] = margins
        log(f"  budget {budget:>2}: ALP {mine.result.vs_full:.2f} / {mine.result.vs_converged:.2f} dB; best baseline "
            f"{best_full.result.vs_full:.2f} ({best_full.name}) / {best_conv.result.vs_converged:.2f} "
            f"({best_conv.name}); margin {margins[0]:+.2f} / {margins[1]:+.2f} dB")
    alp5 = next(r for r in rows if r.budget == 5 and r.name == "ALP")
    log(f"  5 evaluations vs full: {alp5.result.vs_full:.2f} dB (bar 30, margin {alp5.result.vs_full - 30:+.2f}); "
        f"default bar 35 dB: margin {alp5.result.vs_full - 35:+.2f}")
    return verdict


def solver_verdict(rows: list[Row], log) -> None:
    """The pack's adams2/adams3 against ComfyUI's samplers at equal passes."""
    log("pack solvers vs ComfyUI's samplers at equal passes (vs full / vs converged, dB), per grid:")
    for budget in BUDGETS:
        for grid in GRIDS:
            at = {r.name: r.result for r in rows if r.budget == budget and r.family == "solver" and grid in r.name}
            comfy = {k: v for k, v in at.items() if "ComfyUI" in k}
            best_c = max(comfy, key=lambda k: comfy[k].vs_full)
            best_cc = max(comfy, key=lambda k: comfy[k].vs_converged)
            ours = "  ".join(f"{s} {at[f'{solver_label(s)}, {grid} grid'].vs_full:.2f}/"
                             f"{at[f'{solver_label(s)}, {grid} grid'].vs_converged:.2f}" for s in LOOP_SOLVERS)
            log(f"  budget {budget:>2}, {grid:>9}: {ours}; best ComfyUI: {best_c.split(',')[0]} "
                f"{comfy[best_c].vs_full:.2f} vs full, {best_cc.split(',')[0]} {comfy[best_cc].vs_converged:.2f} "
                f"vs converged")


# --------------------------------------------------------------------------------------------------
# Memory (item 5): ALP's state per window, measured here and scaled to 720p x 51 latent frames
# --------------------------------------------------------------------------------------------------

WAN_LATENT_CHANNELS = 16
TARGET_LATENT = (WAN_LATENT_CHANNELS, 51, 720 // 8, 1280 // 8)
TARGET_TOKENS, TARGET_WIDTH = 51 * (720 // 16) * (1280 // 16), 5120


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_memory(model, clip: Clip, log) -> dict:
    sigmas = published(FULL_STEPS)
    config = alp.config_for_speedup(6.0)
    guided = GuidedFaceVelocity(model, clip.reference)
    accelerated = WindowALP(guided, sigmas, config, len(model.blocks))
    peak = {"history": 0, "probe": 0}

    def watching(x, sigma, window, step):
        v = accelerated(x, sigma, window, step)
        state = accelerated.states[window]
        peak["history"] = max(peak["history"], _bytes(state.history_velocities + [state.latent_at_compute]))
        peak["probe"] = max(peak["probe"], _bytes(accelerated.previous_outputs[window] or []))
        return v

    loop.sample_flow_windows(clip.noise, sigmas, PLAN, watching)
    window_elements = clip.noise[:, :, :WINDOW].numel()
    tensors_kept = peak["history"] / (window_elements * 4)
    target_elements = math.prod(TARGET_LATENT)
    target_history = tensors_kept * target_elements * 4
    probe = wan_patch.BlockProbe(())
    tokens = -(-TARGET_TOKENS // -(-TARGET_TOKENS // probe.max_tokens))
    channels = -(-TARGET_WIDTH // -(-TARGET_WIDTH // probe.max_channels))
    target_probe = len(guider.probe_blocks(40)) * tokens * channels * 4
    out = {"toy_history_bytes": peak["history"], "toy_probe_bytes": peak["probe"], "tensors_kept": tensors_kept,
           "target_history_bytes": target_history, "target_probe_bytes": target_probe}
    t0 = time.perf_counter()
    big = torch.empty(int(target_elements), dtype=torch.float32)
    for _ in range(3):
        big.clone()
    copy_seconds = (time.perf_counter() - t0) / 3
    out["host_copy_seconds_per_tensor"] = copy_seconds
    del big
    log(f"ALP state per window (fast preset, order {config.max_order}): toy {peak['history'] / 1024:.0f} KiB history "
        f"({tensors_kept:.0f} latent-sized float32 tensors: velocities + the latent at the last computed step) + "
        f"{peak['probe'] / 1024:.0f} KiB block-probe samples")
    log(f"  at 720p x 51 latent frames ({'x'.join(map(str, TARGET_LATENT))} = {target_elements / 1e6:.2f} M values a "
        f"tensor): {target_history / 2**20:.0f} MiB history + {target_probe / 2**20:.2f} MiB probe (40 blocks of "
        f"width 5120: 6 probed, {tokens}x{channels} samples each) per window")
    log(f"  one latent-sized float32 copy on this host: {copy_seconds * 1000:.0f} ms")
    return out


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(folder: Path, path: Path) -> None:
    log = json.loads((folder / "losses.json").read_text())
    losses = log["losses"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses, color="0.75", lw=0.6, label="per step (batch of 16)")
    ax.plot(range(1, len(losses) + 1), td.moving_average(losses, 25), color="C0", lw=1.5, label="mean of 25 steps")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching MSE")
    cpu = sum(log.get("cpu_seconds", [])) / 60
    ax.set_title(f"training loss (ComfyUI WanModel, width 64; {cpu:.0f} CPU-min)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Each row a video [1, 3, T, H, W] in [-1, 1], frames left to right."""
    plt = _plt()
    frames = rows[0][1].shape[2]
    fig, axes = plt.subplots(len(rows), 1, figsize=(frames * 0.5 + 1.6, len(rows) * 0.55 + 0.2))
    for ax, (label, video) in zip(axes, rows):
        strip = video[0].clamp(-1, 1).add(1).div(2).permute(2, 1, 3, 0).reshape(video.shape[3], -1, 3)
        ax.imshow(strip.numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=6)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(rows: list[Row], full_vs_conv: float, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    names = list(dict.fromkeys(r.name for r in rows if r.budget is not None))
    palette = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        pts = sorted((r.result.evals_mean, r.result.vs_full, r.result.vs_converged) for r in rows
                     if r.name == name and r.budget is not None)
        if name == "ALP":
            style = dict(lw=2.5, color="black")
        elif name.startswith("ALP"):
            style = dict(lw=1.2, color="black", ls="--" if "dial" in name else ":")
        else:
            style = dict(lw=1.0, color=palette[index % len(palette)], ls="-" if "published" in name else "-.")
        for ax, k in zip(axes, (1, 2)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], marker="o", ms=3, label=name, **style)
    speed = sorted((r.result.evals_mean, r.result.vs_full, r.result.vs_converged) for r in rows if r.budget is None)
    for ax, k in zip(axes, (1, 2)):
        ax.plot([p[0] for p in speed], [p[k] for p in speed], "s", color="black", ms=4, mfc="none",
                label="ALP, target speed-ups 2..8x")
    axes[0].axhline(30.0, color="red", ls=":", lw=1, label="bar at 5 evaluations (30 dB)")
    axes[0].axhline(35.0, color="orange", ls=":", lw=1, label="default bar (35 dB)")
    axes[1].axhline(full_vs_conv, color="gray", ls=":", lw=1, label="full 30-step run")
    for ax, title in zip(axes, ("vs full (30 steps, published grid)", "vs converged (Adams-3, 120 steps)")):
        ax.set_xlabel("evaluations per window (each: both guided passes)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("ALP on a trained video DiT (ComfyUI WanModel, width 64, real faces): report clips")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

# (budget, method) whose samples the picture shows: the cheapest ALP against Euler, and the presets that could be
# a default (balanced at 8, quality at 10), to look for artefacts the PSNR does not show.
SHOWN = {(5, "ALP"), (5, "Euler, published grid"), (8, "ALP"), (10, "ALP")}


def budget_rows(model, budgets, tuned: dict, clips: list[Clip], refs: References, cache: ResultCache, log
                ) -> tuple[list[Row], dict[str, list[torch.Tensor]]]:
    """Every method's row at each of ``budgets``, and the 5-evaluation samples shown in the picture."""
    rows: list[Row] = []
    samples: dict[str, list[torch.Tensor]] = {}
    for budget in budgets:
        for name, family, settings, runner in report_methods(model, budget, tuned):
            keep = (budget, name) in SHOWN
            key_name, key_budget = ("ALP", None) if family == "alp" else (name, budget)  # a config scores once
            result, per_clip, kept = cache.score(key_name, key_budget, settings, runner, clips, refs, keep)
            if result.evals_max > budget:
                raise RuntimeError(f"{name} used {result.evals_max} evaluations at budget {budget}")
            if keep:
                samples[f"{name}, {budget}"] = kept
            row = Row(budget, name, family, settings, result, per_clip)
            rows.append(row)
            log(format_row(row))
        log("")
    return rows, samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retune", action="store_true", help="redo the tuning on the tuning clips")
    parser.add_argument("--tune-only", action="store_true", help="stop after the tuning")
    parser.add_argument("--tune-budgets", default=None,
                        help="tune only these budgets (e.g. 5,10) into a part file and stop; the report merges "
                             "the parts once they cover every budget (two processes on two cores)")
    parser.add_argument("--report-part", action="store_true",
                        help="with --tune-budgets: then score the report rows of those budgets into a part cache "
                             "(the full run reads it) and stop")
    parser.add_argument("--write-docs", action="store_true", help="copy the loss and quality plots to docs/")
    parser.add_argument("--fresh", action="store_true", help="score every report row again (no cached scores)")
    parser.add_argument("--report-per-video", type=int, default=REPORT_PER_VIDEO)
    parser.add_argument("--tuning-per-video", type=int, default=TUNING_PER_VIDEO)
    args = parser.parse_args(argv)
    if args.report_part and args.tune_budgets is None:
        parser.error("--report-part needs --tune-budgets")
    started = time.time()

    def log(message: str) -> None:
        print(message, flush=True)

    model, frames, folder = td.trained_model(log=log)
    out = folder
    tuning_clips = make_clips(frames, "tuning", args.tuning_per_video, 2000)
    tuning_path = folder / "tuning.json"
    part_budgets = BUDGETS if args.tune_budgets is None else parse_budgets(args.tune_budgets, BUDGETS)
    merged = (None if args.retune or args.tune_budgets is not None or tuning_path.is_file()
              else merge_part_files(folder, BUDGETS))
    part_path = folder / part_name(part_budgets)
    wanted = tuning_path if args.tune_budgets is None else part_path
    if merged is not None:
        log("tuning merged from the part files")
        tuning_path.write_text(json.dumps(merged, indent=1))
    elif args.retune or not wanted.is_file():
        log(f"tuning budgets {part_budgets} on {len(tuning_clips)} clips of {td.SPLIT['tuning']}")
        tuning_refs = References(model, tuning_clips, folder / "references_tuning.pt")
        tuned = {}
        if BUDGETS[0] in part_budgets:  # one part checks the converged reference
            check = loop_runner(model, schedules.simple_sigmas(2 * CONVERGED_STEPS, SHIFT), solver="adams3")
            tuned["converged_check_db"] = [psnr(check(c)[0], conv)
                                           for c, conv in zip(tuning_clips[:1], tuning_refs.converged[:1])]
            log(f"converged ({CONVERGED_STEPS} Adams-3 steps) vs {2 * CONVERGED_STEPS}: "
                f"{' '.join(f'{v:.1f}' for v in tuned['converged_check_db'])} dB")
        tuned.update(tune(model, tuning_clips, tuning_refs, log, part_budgets))
        wanted.write_text(json.dumps(tuned, indent=1))
        log(f"tuning written: {wanted}")
    if args.tune_budgets is not None:
        if not args.report_part:
            return 0
        tuned = json.loads(part_path.read_text())
        clips = make_clips(frames, "report", args.report_per_video, 1000)
        refs = References(model, clips, folder / "references_report.pt")
        cache = ResultCache(folder / ("report_cache_" + part_name(part_budgets).removeprefix("tuning_")), clips,
                            enabled=not args.fresh)
        log(f"report part: budgets {part_budgets} on {len(clips)} clips (the shipped ALP settings)")
        log(HEADER)
        budget_rows(model, part_budgets, tuned, clips, refs, cache, log)
        return 0
    tuned = json.loads(tuning_path.read_text())
    log("anchors found on the tuning clips (speed-up, max_order, first_trust, error_tolerance, pace):")
    for line in suggested_anchors(tuned):
        log(line)
    if args.tune_only:
        return 0

    clips = make_clips(frames, "report", args.report_per_video, 1000)
    log(f"report: {len(clips)} clips of {td.SPLIT['report']} ({EVAL_FRAMES} frames, windows {PLAN.windows})")
    refs = References(model, clips, folder / "references_report.pt")
    cache = ResultCache(folder / "report_cache.json", clips, enabled=not args.fresh,
                        also=tuple(sorted(folder.glob("report_cache_part_*.json"))))
    full_vs_conv = sum(psnr(f, c) for f, c in zip(refs.full, refs.converged)) / len(clips)
    log(f"full vs converged: {full_vs_conv:.2f} dB")
    log(HEADER)
    rows, samples = budget_rows(model, BUDGETS, tuned, clips, refs, cache, log)
    log("ALP presets and target speed-ups (shipped settings, layer dial as shipped):")
    preset_of = {alp.PRESETS[name].speedup: name for name in PRESET_NAMES}
    for speedup in SPEEDUPS:
        config = alp.config_for_speedup(speedup)
        result, per_clip, _ = cache.score("ALP", None, describe(config), alp_runner(model, config), clips, refs, False)
        name = f"ALP x{speedup:g}" + (f" (preset {preset_of[speedup]})" if speedup in preset_of else "")
        row = Row(None, name, "alp", f"budget {alp.step_budget(FULL_STEPS, config)}; {describe(config)}", result,
                  per_clip)
        rows.append(row)
        log(format_row(row))
    for name in PRESET_NAMES:
        if alp.PRESETS[name].speedup not in SPEEDUPS:
            config = alp.PRESETS[name]
            result, per_clip, _ = cache.score("ALP", None, describe(config), alp_runner(model, config), clips, refs,
                                              False)
            row = Row(None, f"ALP preset {name} (x{config.speedup:g})", "alp", describe(config), result, per_clip)
            rows.append(row)
            log(format_row(row))
    log("")
    verdict = print_bar(rows, log)
    solver_verdict(rows, log)
    per_video = {}
    for video in td.SPLIT["report"]:
        idx = [k for k, c in enumerate(clips) if c.video == video]
        for budget in BUDGETS:
            mine = next(r for r in rows if r.budget == budget and r.name == "ALP")
            vals = [mine.per_clip[k].vs_full for k in idx]
            per_video[f"{video} {budget}"] = mean_and_spread(vals)
    log("ALP vs full per report video (mean, sd over its clips): " +
        "; ".join(f"{k}: {m:.2f} ({s:.2f})" for k, (m, s) in per_video.items()))
    memory = measure_memory(model, clips[0], log)

    loss_png, samples_png, quality_png = (out / "alp_trained_loss.png", out / "alp_trained_samples.png",
                                          out / "alp_trained_quality_vs_cost.png")
    plot_losses(folder, loss_png)
    picture = []
    for k in (0, len(clips) - 1):
        picture += [(f"{clips[k].video} real", clips[k].real), ("full, 30 steps", refs.full[k]),
                    ("ALP fast, 5 evals", samples["ALP, 5"][k]),
                    ("Euler, 5 steps", samples["Euler, published grid, 5"][k]),
                    ("ALP balanced, 8", samples["ALP, 8"][k]), ("ALP quality, 10", samples["ALP, 10"][k])]
    plot_samples(picture, samples_png)
    plot_quality(rows, full_vs_conv, quality_png)
    (out / "report.json").write_text(json.dumps({
        "rows": [{"budget": r.budget, "name": r.name, "settings": r.settings, **asdict(r.result)} for r in rows],
        "full_vs_converged": full_vs_conv, "bar_margins": verdict, "memory": memory}, indent=1))
    for path in (loss_png, samples_png, quality_png):
        log(f"plot: {path}")
        # The sample picture shows frames of the driving videos, which stay in ../shared/data: not copied to docs/.
        if args.write_docs and path != samples_png:
            shutil.copy(path, REPO / "docs" / path.name)
    log(f"command: python benchmarks/alp_trained.py   ({(time.time() - started) / 60:.0f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
