"""A small Wan-style flow-matching video DiT trained on real faces: the testbed ALP is judged on.

Everything below was fixed before any ALP result on this model was looked at, and is not to be changed to make
a method pass:

- Data: the ten ``lp_d*.mp4`` videos of ``../shared/data/driving`` (face-centred 480-512 px squares, 3,473
  frames), each frame area-downscaled to 32x32 RGB in [-1, 1]. A clip is ``CLIP_FRAMES`` = 8 frames taken every
  ``FRAME_STRIDE`` = 2nd frame, starting at any frame. The ``lp_s*`` videos (full body, portrait orientation)
  are not used.
- Split by video (``SPLIT``): report clips come from lp_d19 and lp_d20, tuning clips from lp_d12 and lp_d18,
  training clips from the other six (2,649 frames, 2,565 clips; horizontal flips double them).
- Model: ComfyUI's own ``comfy.ldm.wan.model.WanModel`` (the class the pack drives), text-to-video blocks at
  width 64: 6 blocks, 2 heads, FFN 256, patch (1, 4, 4), so 64 tokens a frame (512 a window); 0.45 M
  parameters. (Width 128 costs twice the CPU time per pass for the same token count: the evaluation below would
  not fit in a working session on two shared cores.) I2V-style first-frame condition: the input is the noisy
  clip concatenated with a mask channel (1 at the known frame 0) and the first frame at frame 0 (zeros after
  it), as ComfyUI's WAN21 passes Wan's I2V condition, plus the first frame in every frame's channels (an
  identity signal at every frame, as FlashPortrait's per-frame portrait tokens are; the 14B model learned to
  carry frame 0 forward over a long training, which this budget cannot buy: trained with frame 0 alone, the
  same budget gave faces only at frame 0). The context the blocks cross-attend to is the first frame's 4x4
  patches with their 2-D position (in place of Wan's CLIP image tokens). With probability
  ``CONDITION_DROPOUT`` = 0.1 the whole condition is dropped (mask, images and context zero), so the
  sampler can guide on the first frame (classifier-free guidance, ``GUIDANCE`` = 2).
- Training: flow matching, x_s = (1 - s) x0 + s noise, target v = noise - x0, s ~ U(0, 1), MSE over all frames;
  AdamW (lr 8e-4, betas 0.9/0.99, weight decay 0.01), 50 warm-up steps then cosine decay laid out over 900
  steps, gradient clip 1, batch 16, seed 0, one CPU thread. Budget: 700 steps (11,200 clips drawn, about 30
  min of one core's CPU time): the cosine runs to step 600, then the rate falls linearly from 35 % to 10 % of
  its peak over the last 100 steps. (Planned: the whole 900-step cosine, 2.6 s a step on a free core; fixed at
  step 600, before any ALP result on the model, when the shared machine slowed it to 6-9 s a step and the
  900 steps would have left no time for the evaluation. The first 600 steps are the same in both.) The
  trained weights, the loss log and the frames cache sit in ``benchmarks/out/alp_trained/`` (git-ignored) and
  are reused by later runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DRIVING_DIR = REPO.parent / "shared" / "data" / "driving"
CACHE_DIR = REPO / "benchmarks" / "out" / "alp_trained"

FRAME_SIZE = 32
CLIP_FRAMES = 8
FRAME_STRIDE = 2
PATCH = 4
CONDITION_DROPOUT = 0.1
GUIDANCE = 2.0
CONDITION_FORM = "mask + frame 0 + first frame at every frame + patch context"  # part of the cache tag
VIDEOS = tuple(f"lp_d{n}.mp4" for n in (0, 3, 6, 10, 11, 12, 14, 18, 19, 20))
SPLIT = {
    "report": ("lp_d19.mp4", "lp_d20.mp4"),
    "tuning": ("lp_d12.mp4", "lp_d18.mp4"),
    "train": ("lp_d0.mp4", "lp_d3.mp4", "lp_d6.mp4", "lp_d10.mp4", "lp_d11.mp4", "lp_d14.mp4"),
}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def check_split(split: dict[str, Sequence[str]] = SPLIT, videos: Sequence[str] = VIDEOS) -> None:
    """Every video in exactly one role; raises ValueError naming the offending video otherwise."""
    seen: dict[str, str] = {}
    for role, names in split.items():
        for name in names:
            if name in seen:
                raise ValueError(f"{name} is in both the {seen[name]} and the {role} split")
            seen[name] = role
    missing = sorted(set(videos) - set(seen))
    extra = sorted(set(seen) - set(videos))
    if missing or extra:
        raise ValueError(f"split does not cover the videos: missing {missing}, unknown {extra}")


def decode_frames(path: Path, size: int = FRAME_SIZE) -> torch.Tensor:
    """All frames of one video, area-downscaled to ``size`` x ``size``: uint8 [N, 3, size, size]."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float()
            small = torch.nn.functional.interpolate(rgb, size=(size, size), mode="area")[0]
            frames.append(small.round().clamp(0, 255).to(torch.uint8))
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return torch.stack(frames)


def load_frames(cache_dir: Path = CACHE_DIR, driving_dir: Path = DRIVING_DIR) -> dict[str, torch.Tensor]:
    """Frames of every video in ``VIDEOS`` (uint8 [N, 3, 32, 32]), decoded once and cached."""
    cache = cache_dir / f"frames_{FRAME_SIZE}.pt"
    if cache.is_file():
        frames = torch.load(cache)
        if set(frames) == set(VIDEOS):
            return frames
    missing = [name for name in VIDEOS if not (driving_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"driving videos {missing} not found in {driving_dir}")
    frames = {name: decode_frames(driving_dir / name) for name in VIDEOS}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(frames, cache)
    return frames


def clip_starts(frame_count: int, clip_frames: int = CLIP_FRAMES, stride: int = FRAME_STRIDE) -> range:
    """Start frames of every clip of ``clip_frames`` frames taken every ``stride``-th frame."""
    return range(max(0, frame_count - (clip_frames - 1) * stride))


def clip_index(frames: dict[str, torch.Tensor], role: str, clip_frames: int = CLIP_FRAMES,
               stride: int = FRAME_STRIDE) -> list[tuple[str, int]]:
    """(video, start) of every clip of the ``role`` split (``train``, ``tuning`` or ``report``)."""
    if role not in SPLIT:
        raise ValueError(f"role must be one of {sorted(SPLIT)}, got {role!r}")
    return [(name, start) for name in SPLIT[role] for start in clip_starts(len(frames[name]), clip_frames, stride)]


def evaluation_clips(frames: dict[str, torch.Tensor], role: str, per_video: int, clip_frames: int,
                     stride: int = FRAME_STRIDE) -> list[tuple[str, int]]:
    """``per_video`` clips of each video of ``role``, their starts spread evenly over the video."""
    out = []
    for name in SPLIT[role]:
        starts = clip_starts(len(frames[name]), clip_frames, stride)
        if len(starts) < per_video:
            raise ValueError(f"{name} holds {len(starts)} clips of {clip_frames} frames, fewer than {per_video}")
        picks = torch.linspace(0, len(starts) - 1, per_video + 2)[1:-1].round().long().tolist()
        out.extend((name, starts[p]) for p in picks)
    return out


def clip_tensor(frames: dict[str, torch.Tensor], clips: Sequence[tuple[str, int]], clip_frames: int,
                stride: int = FRAME_STRIDE) -> torch.Tensor:
    """Clips as float [B, 3, T, H, W] in [-1, 1]."""
    batch = [frames[name][start:start + (clip_frames - 1) * stride + 1:stride] for name, start in clips]
    return torch.stack(batch).permute(0, 2, 1, 3, 4).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# The model and its condition
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    num_layers: int = 6
    num_heads: int = 2
    ffn_dim: int = 256
    freq_dim: int = 256
    channels: int = 3
    size: int = FRAME_SIZE
    patch: int = PATCH

    @property
    def context_dim(self) -> int:
        return self.channels * self.patch * self.patch + 16  # patch values + 2-D sinusoidal position


def build_model(config: ModelConfig = ModelConfig(), seed: int = 0) -> torch.nn.Module:
    """ComfyUI's WanModel at this width, initialised as Wan initialises it (its ComfyUI ops leave weights empty)."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, config.patch, config.patch), text_len=1,
                     in_dim=3 * config.channels + 1, dim=config.dim, ffn_dim=config.ffn_dim,
                     freq_dim=config.freq_dim, text_dim=config.context_dim, out_dim=config.channels,
                     num_heads=config.num_heads, num_layers=config.num_layers,
                     operations=comfy.ops.disable_weight_init)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("modulation"):
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(config.dim))
            elif name.startswith("head.head."):
                param.zero_()  # the network starts by predicting v = 0
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                fan_out, fan_in = param.shape[0], param[0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier uniform
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
    return model


def _position_features(grid: int, channels: int = 16) -> torch.Tensor:
    """[grid * grid, channels] sinusoidal features of each patch's row and column."""
    quarter = channels // 4
    freqs = torch.pow(100.0, -torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


def condition_inputs(reference: torch.Tensor, frames: int, keep: torch.Tensor, patch: int = PATCH
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The I2V condition of a batch of first frames [B, 3, H, W]: (concat [B, 7, frames, H, W], context [B, P, D]).

    concat: a mask channel (1 at the known frame 0), the first frame at frame 0 with zeros after it (ComfyUI's
    WAN21 ``c_concat``), and the first frame at every frame; context: the first frame's patches with their
    position. Rows where ``keep`` is False get the dropped (unconditional) form: everything zero.
    """
    b, c, h, w = reference.shape
    keep = keep.to(reference.dtype).view(b, 1, 1, 1)
    concat = reference.new_zeros(b, 2 * c + 1, frames, h, w)
    concat[:, 0, 0] = keep[:, 0]
    concat[:, 1:c + 1, 0] = reference * keep
    concat[:, c + 1:] = (reference * keep).unsqueeze(2)
    patches = reference.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, gh, gw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)
    position = _position_features(h // patch).to(reference.dtype).expand(b, -1, -1)
    context = torch.cat([patches, position], dim=2) * keep.view(b, 1, 1)
    return concat, context


def model_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, reference: torch.Tensor,
                   conditioned: bool | torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
    """One pass of the model: the flow velocity at ``x`` [B, 3, T, H, W] and noise level ``sigma`` (ComfyUI's
    flow timestep is sigma * 1000)."""
    b, _, frames = x.shape[:3]
    keep = conditioned if isinstance(conditioned, torch.Tensor) else torch.full((b,), bool(conditioned))
    concat, context = condition_inputs(reference, frames, keep)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(b) if torch.as_tensor(sigma).ndim == 0 else sigma
    return model(torch.cat([x.float(), concat], dim=1), sigma.float() * 1000.0, context,
                 transformer_options=transformer_options or {})


# --------------------------------------------------------------------------------------------------
# Training (cached)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 700
    schedule_steps: int = 900  # the cosine decay is laid out over this many steps ...
    anneal_steps: int = 100  # ... and the last anneal_steps fall linearly from where it is to final_lr_fraction
    batch: int = 16
    lr: float = 8e-4
    warmup: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    model: ModelConfig = ModelConfig()

    def tag(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + json.dumps(SPLIT, sort_keys=True) + CONDITION_FORM
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def cosine_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_fraction`` at ``schedule_steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.schedule_steps - config.warmup))
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def learning_rate(config: TrainConfig, step: int) -> float:
    """The cosine schedule until ``steps - anneal_steps``, then a linear fall to ``final_lr_fraction`` at the last
    step: training can stop before ``schedule_steps`` and still end at a low rate."""
    anneal_from = config.steps - config.anneal_steps
    if config.anneal_steps <= 0 or step < anneal_from:
        return cosine_rate(config, step)
    start, end = cosine_rate(config, anneal_from), config.lr * config.final_lr_fraction
    return start + (end - start) * (step - anneal_from + 1) / config.anneal_steps


def training_batch(frames: dict[str, torch.Tensor], clips: Sequence[tuple[str, int]], batch: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0 clips, noise, sigma, keep-condition) for one step, drawn with ``gen``; half the clips flipped."""
    picks = torch.randint(len(clips), (batch,), generator=gen).tolist()
    x0 = clip_tensor(frames, [clips[p] for p in picks], CLIP_FRAMES)
    flip = torch.rand(batch, generator=gen) < 0.5
    x0[flip] = x0[flip].flip(-1)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.rand(batch, generator=gen)
    keep = torch.rand(batch, generator=gen) >= CONDITION_DROPOUT
    return x0, noise, sigma, keep


def train(config: TrainConfig, frames: dict[str, torch.Tensor], folder: Path,
          log: Callable[[str], None] = print) -> torch.nn.Module:
    """Train (or resume from the last checkpoint in ``folder``); writes ``model.pt`` and ``losses.json`` there."""
    folder.mkdir(parents=True, exist_ok=True)
    final, partial = folder / "model.pt", folder / "checkpoint.pt"
    model = build_model(config.model, config.seed)
    if final.is_file():
        model.load_state_dict(torch.load(final))
        return model.eval()
    clips = clip_index(frames, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    start = 0
    if partial.is_file():
        saved = torch.load(partial, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        losses, seconds, cpu_seconds, start = saved["losses"], saved["seconds"], saved["cpu_seconds"], saved["step"]
        log(f"resumed training at step {start}")
    log(f"training {sum(p.numel() for p in model.parameters()):,} parameters on {len(clips)} clips "
        f"for {config.steps} steps of {config.batch}")
    model.train()
    for step in range(start, config.steps):
        began, began_cpu = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        x0, noise, sigma, keep = training_batch(frames, clips, config.batch, gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        prediction = model_velocity(model, (1 - s) * x0 + s * noise, sigma, x0[:, :, 0], keep)
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - began)
        cpu_seconds.append(time.process_time() - began_cpu)
        if (step + 1) % 25 == 0 or step + 1 == config.steps:
            recent = losses[-25:]
            log(f"step {step + 1}/{config.steps}: loss {sum(recent) / len(recent):.4f}, "
                f"{sum(seconds[-25:]) / len(seconds[-25:]):.2f} s/step, {sum(seconds) / 60:.1f} min so far "
                f"({sum(cpu_seconds) / 60:.1f} min of CPU time)")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                        "losses": losses, "seconds": seconds, "cpu_seconds": cpu_seconds, "step": step + 1}, partial)
    torch.save(model.state_dict(), final)
    (folder / "losses.json").write_text(json.dumps({"config": asdict(config), "losses": losses,
                                                    "seconds": seconds, "cpu_seconds": cpu_seconds}))
    partial.unlink(missing_ok=True)
    return model.eval()


def trained_model(config: TrainConfig = TrainConfig(), log: Callable[[str], None] = print,
                  cache_dir: Path = CACHE_DIR) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Path]:
    """The trained model (trained now if not cached), the frames, and the model's cache folder."""
    check_split()
    frames = load_frames(cache_dir)
    folder = cache_dir / f"model_{config.tag()}"
    model = train(config, frames, folder, log)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, frames, folder


def moving_average(values: Sequence[float], width: int) -> list[float]:
    """Trailing mean over up to ``width`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def use_host() -> None:
    """ComfyUI's ``comfy`` importable in this process, on the CPU, one thread, PyTorch's attention.

    One thread: on a shared machine two threads spin against other processes (a 10x slowdown measured here).
    PyTorch's scaled-dot-product attention is what ComfyUI runs on a GPU; on the CPU it would otherwise pick its
    sub-quadratic fallback, several times slower, which only changes speed, not results' meaning.
    """
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from inprocess_host import use_host_in_process

    use_host_in_process()
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True
    torch.set_num_threads(1)


def main() -> int:
    """Train (or load) the testbed model alone: ``python benchmarks/trained_dit.py [--steps N]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    use_host()
    _, _, folder = trained_model(TrainConfig(steps=args.steps), log=lambda m: print(m, flush=True))
    print(f"model: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
