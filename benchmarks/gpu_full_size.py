"""The real size on a GPU: the full Wan 2.1 I2V 14B architecture with FlashPortrait's emotion projections, random
weights, through ComfyUI's Wan model and the FlashPortrait Sampler node. **Meant for a GPU run** (an 80 GB-class
GPU for bf16 at 720x720 x 51 latent frames); ``--tiny`` runs the same code on the CPU at a tiny width, which is
how the test suite keeps it working where no GPU is.

Nothing is read from disk: the DiT weights are drawn tensor by tensor into the pack's model loader path
(``nodes/dit_loading.py``, the code the FlashPortrait Model Loader runs), the portrait encoder and the Wan VAE at
their published sizes, the prompt and CLIP-vision conditioning as random tensors of their real shapes (512 umT5
tokens of 4096, 257 CLIP tokens of 1280). Each configuration runs one window of the chosen length through the
sampler node and reads its report:

* seconds per window step and per DiT pass (denoising time only; encoding the reference is reported apart),
* peak VRAM (``torch.cuda.max_memory_allocated``, reset before each run),
* bf16 against fp8 (e4m3fn) weight storage,
* ALP's cost per computed and per skipped step: two ALP runs of different lengths give two equations
  (computed x t_c + skipped x t_s = denoising seconds), solved for t_c and t_s; t_c minus the plain step time is
  ALP's overhead on a computed step.

    .venv/bin/python benchmarks/gpu_full_size.py [--sizes 720x720 480x832] [--windows 51 33] [--dtypes bf16 fp8]
        [--steps 2] [--alp-steps 8 12] [--alp-preset quality] [--json out.json]
    .venv/bin/python benchmarks/gpu_full_size.py --tiny      # CPU, tiny width: checks the script, measures nothing

The default grid (2 dtypes x 2 sizes x 2 windows, plus two ALP runs per dtype) is expected to take about half an
hour on one H100/H200-class GPU (an estimate from the token count, ~100k tokens per 720x720 x 51-frame DiT pass;
not measured yet). Within a shorter budget, run the grid in parts,
e.g. ``--dtypes bf16 --sizes 720x720 --windows 51 33 --alp-steps 6 9`` first; ``--json`` is rewritten after every
row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Appended, not put first: ComfyUI's own top-level ``nodes`` module must stay ahead of this repository's nodes/.
sys.path.extend(str(REPO_ROOT / folder) for folder in ("tests", "scripts"))

WAN_14B = {"dim": 5120, "ffn_dim": 13824, "num_blocks": 40, "token_dim": 2048}
TINY = {"dim": 128, "ffn_dim": 256, "num_blocks": 2, "token_dim": 64}
TEXT_DIM, TEXT_TOKENS, CLIP_DIM, CLIP_TOKENS, FREQ_DIM, LATENT_CHANNELS, IN_DIM = 4096, 512, 1280, 257, 256, 16, 36
REPORT = re.compile(r"denoising ([\d.]+) s")


def dit_shapes(dim: int, ffn_dim: int, num_blocks: int, token_dim: int) -> dict[str, tuple[int, ...]]:
    """Every weight of a Wan 2.1 I2V DiT with FlashPortrait's emotion projections, by its published name."""
    shapes = {"patch_embedding.weight": (dim, IN_DIM, 1, 2, 2), "patch_embedding.bias": (dim,),
              "head.modulation": (1, 2, dim)}
    for name, out_dim, in_dim in (("text_embedding.0", dim, TEXT_DIM), ("text_embedding.2", dim, dim),
                                  ("time_embedding.0", dim, FREQ_DIM), ("time_embedding.2", dim, dim),
                                  ("time_projection.1", 6 * dim, dim), ("head.head", 4 * LATENT_CHANNELS, dim),
                                  ("img_emb.proj.1", CLIP_DIM, CLIP_DIM), ("img_emb.proj.3", dim, CLIP_DIM)):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out_dim, in_dim), (out_dim,)
    for name, width in (("img_emb.proj.0", CLIP_DIM), ("img_emb.proj.4", dim)):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (width,)
    for i in range(num_blocks):
        block = f"blocks.{i}"
        for attn, projections in (("self_attn", "qkvo"), ("cross_attn", ("q", "k", "v", "o", "k_img", "v_img"))):
            for p in projections:
                shapes[f"{block}.{attn}.{p}.weight"], shapes[f"{block}.{attn}.{p}.bias"] = (dim, dim), (dim,)
            for norm in ("norm_q", "norm_k", *(("norm_k_img",) if attn == "cross_attn" else ())):
                shapes[f"{block}.{attn}.{norm}.weight"] = (dim,)
        shapes[f"{block}.norm3.weight"] = shapes[f"{block}.norm3.bias"] = (dim,)
        shapes[f"{block}.ffn.0.weight"], shapes[f"{block}.ffn.0.bias"] = (ffn_dim, dim), (ffn_dim,)
        shapes[f"{block}.ffn.2.weight"], shapes[f"{block}.ffn.2.bias"] = (dim, ffn_dim), (dim,)
        shapes[f"{block}.modulation"] = (1, 6, dim)
        for name in ("emo_k_proj", "emo_v_proj"):
            shapes[f"{block}.cross_attn.{name}.weight"] = (dim, token_dim)
    return shapes


class RandomDit:
    """A checkpoint reader (``flashportrait_core.weights.reader``'s interface) that draws each weight when asked:
    linear weights ~ N(0, 1/fan_in), biases and modulations small, norm scales 1. Drawn on the GPU when there is
    one (fast), handed to the loader on the CPU like a file's tensor."""

    access = "random weights, drawn tensor by tensor"
    metadata: dict = {}

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0):
        self._shapes, self._dtype = shapes, dtype
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._gen = torch.Generator(self._device).manual_seed(seed)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def meta(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, dtype=self._dtype, device="meta") for k, s in self._shapes.items()}

    def read(self, key: str) -> torch.Tensor:
        shape = self._shapes[key]
        if ".norm" in key or key.startswith("img_emb.proj.0") or key.startswith("img_emb.proj.4"):
            value = torch.ones(shape, device=self._device) if key.endswith("weight") else torch.zeros(
                shape, device=self._device)
        else:
            scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 and "modulation" not in key else 0.02
            value = torch.randn(shape, generator=self._gen, device=self._device) * scale
        return value.to(self._dtype).cpu()

    def release(self, keys) -> None:
        pass

    def close(self) -> None:
        pass


def build_model(pack, arch: dict, weight_dtype: str):
    from flashportrait_pack.flashportrait_core.weights.checkpoints import FLASHPORTRAIT, plan_flashportrait_dit

    reader = RandomDit(dit_shapes(**arch), torch.bfloat16)
    layout = plan_flashportrait_dit(reader.meta(), None, flashportrait_name="random 14B DiT")
    options = dict(pack.nodes.loaders._WEIGHT_DTYPES[weight_dtype])
    return pack.nodes.dit_loading.build_flashportrait_model(layout, {FLASHPORTRAIT: reader}, options,
                                                            "random 14B DiT").model


def conditioning(pack, arch: dict, latent_frames: int, tiny: bool):
    """(positive, negative, clip_vision_output, emotion) at the real shapes, random values."""
    import comfy.clip_vision
    from flashportrait_pack.flashportrait_core.conditioning import portrait_encoder as pe

    gen = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen), {}]]
    negative = [[torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen), {}]]
    clip = comfy.clip_vision.Output()
    clip["penultimate_hidden_states"] = torch.randn(1, CLIP_TOKENS, CLIP_DIM, generator=gen)
    if tiny:
        weights = pe.random_portrait_encoder_state_dict(seed=2, output_dim=arch["token_dim"])
    else:
        published = pe.PUBLISHED_PORTRAIT_ENCODER_CONFIG
        weights = pe.random_portrait_encoder_state_dict(seed=2, output_dim=published.output_dim,
                                                        resampler_dim=published.mouth.dim, depth=published.mouth.depth,
                                                        heads=published.mouth.heads)
    encoder = pe.load_portrait_encoder(weights).float()
    frames = 4 * (latent_frames - 1) + 1
    expressions = SimpleNamespace(features=torch.randn(frames, encoder.config.feature_dim, generator=gen),
                                  found=None)
    emotion = pack.nodes.conditioning.FlashPortraitEmotionConditioning.execute(
        expressions, encoder, ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0).result[0]
    return positive, negative, clip, emotion


def vae(tiny: bool):
    import comfy.sd

    from make_tiny_models import wan_vae_state_dict

    return comfy.sd.VAE(sd=wan_vae_state_dict(seed=4, dim=16 if tiny else 96))


def run_sampler(pack, model, vae_model, cond, height: int, width: int, latent_frames: int, steps: int,
                acceleration: str) -> dict:
    positive, negative, clip, emotion = cond
    reference = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(3))
    windows = pack.nodes.windows.WindowSettings(latent_frames, 0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    output = pack.nodes.sampler.FlashPortraitSampler.execute(
        model, positive, negative, clip, vae_model, reference, emotion, windows, seed=0, steps=steps, shift=5.0,
        max_side=max(height, width), acceleration=acceleration)
    counts = output.ui["flashportrait_report"][0]
    text = output.result[1]
    denoise = float(REPORT.search(text).group(1))
    return {"steps": counts["steps"], "passes": counts["dit_passes"], "computed": counts["steps_computed"],
            "skipped": counts["steps_skipped"], "seconds": counts["seconds"], "denoise": denoise,
            "peak_vram_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


def alp_costs(first: dict, second: dict) -> tuple[float | None, float | None]:
    """(seconds per computed step, per skipped step) from two ALP runs, or None where the runs cannot tell."""
    a, b, c, d = first["computed"], first["skipped"], second["computed"], second["skipped"]
    det = a * d - b * c
    if abs(det) < 1e-9:
        return (first["denoise"] / a if a and not b else None), None
    return ((first["denoise"] * d - second["denoise"] * b) / det, (a * second["denoise"] - c * first["denoise"]) / det)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny width on the CPU (checks the script only)")
    parser.add_argument("--sizes", nargs="+", default=None, help="HEIGHTxWIDTH of the video (default 720x720 480x832)")
    parser.add_argument("--windows", nargs="+", type=int, default=None, help="window lengths in latent frames")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    parser.add_argument("--steps", type=int, default=2, help="steps of each plain run (seconds are per step)")
    parser.add_argument("--alp-steps", nargs=2, type=int, default=[8, 12], metavar=("N1", "N2"),
                        help="steps of the two ALP runs (first size and window only)")
    parser.add_argument("--alp-preset", default="quality")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    sizes = args.sizes or (["32x32", "32x48"] if args.tiny else ["720x720", "480x832"])
    window_lengths = args.windows or ([3, 2] if args.tiny else [51, 33])
    arch = TINY if args.tiny else WAN_14B
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no GPU: this benchmark measures the 14B model on a GPU; --tiny checks it on the CPU")

    from pack import import_pack

    pack = import_pack()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: {device}; DiT dim {arch['dim']}, {arch['num_blocks']} blocks, FFN {arch['ffn_dim']}, emotion "
          f"tokens {arch['token_dim']}", flush=True)
    vae_model = vae(args.tiny)
    rows = []
    for dtype_name in args.dtypes:
        start = time.perf_counter()
        model = build_model(pack, arch, "default" if dtype_name == "bf16" else "fp8_e4m3fn")
        print(f"{dtype_name}: model built in {time.perf_counter() - start:.1f} s", flush=True)
        for size in sizes:
            height, width = (int(side) for side in size.split("x"))
            for length in window_lengths:
                cond = conditioning(pack, arch, length, args.tiny)
                run = run_sampler(pack, model, vae_model, cond, height, width, length, args.steps, "off")
                row = {"dtype": dtype_name, "size": size, "window": length, **run,
                       "s_per_step": run["denoise"] / run["steps"], "s_per_pass": run["denoise"] / run["passes"]}
                if size == sizes[0] and length == window_lengths[0]:
                    alp = [run_sampler(pack, model, vae_model, cond, height, width, length, n, args.alp_preset)
                           for n in args.alp_steps]
                    computed, skipped = alp_costs(*alp)
                    row["alp"] = {"preset": args.alp_preset, "runs": alp, "s_per_computed_step": computed,
                                  "s_per_skipped_step": skipped,
                                  "overhead_per_computed_step": None if computed is None else
                                  computed - row["s_per_step"]}
                rows.append(row)
                if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                    args.json.write_text(json.dumps({"device": device, "arch": arch, "rows": rows}, indent=1))
                vram = "" if run["peak_vram_gib"] is None else f", peak VRAM {run['peak_vram_gib']:.1f} GiB"
                print(f"{dtype_name} {size} window {length}: {row['s_per_step']:.3f} s/step, "
                      f"{row['s_per_pass']:.3f} s/DiT pass ({run['passes']} passes, {run['steps']} steps; whole "
                      f"node {run['seconds']:.1f} s){vram}", flush=True)
                if "alp" in row:
                    alp_row = row["alp"]
                    fmt = lambda v: "n/a" if v is None else f"{v:.3f} s"  # noqa: E731
                    print(f"  ALP {args.alp_preset}: {fmt(alp_row['s_per_computed_step'])} per computed step "
                          f"(overhead {fmt(alp_row['overhead_per_computed_step'])}), "
                          f"{fmt(alp_row['s_per_skipped_step'])} per skipped step; runs "
                          + ", ".join(f"{r['steps']} steps: {r['computed']} computed / {r['skipped']} skipped"
                                      for r in alp_row["runs"]), flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
