"""Write random-weight, format-faithful FlashPortrait checkpoints at tiny widths.

Every file carries the published key names, tensor layouts and containers (safetensors, or a torch pickle
nested under ``state_dict`` like the published ``transformer.pt``), so the pack's loaders, ComfyUI's model
detection and the sampler run exactly the code paths of the real 14B files. Only the widths are small.
The PD-FGC expression encoder is written at its real size (9M parameters).

The output folder is laid out like ComfyUI's ``models/``::

    diffusion_models/wan2.1_i2v_tiny.safetensors      base Wan 2.1 I2V DiT (no emotion projections)
    flashportrait/transformer_tiny.pt                 FlashPortrait DiT overlay, torch pickle under "state_dict"
    flashportrait/transformer_tiny.safetensors        the same overlay as safetensors
    flashportrait/portrait_encoder_tiny.safetensors   portrait encoder (published prefixes)
    flashportrait/pd_fpg_tiny.pth                     PD-FGC expression encoder, real architecture
    vae/wan_2.1_vae_tiny.safetensors                  narrow Wan 2.1 VAE
    flashportrait_conditioning/tiny_prompt.safetensors  precomputed text + CLIP-vision conditioning
    loras/fast_lora_tiny.safetensors                  4-step distillation LoRA in the published key format

Usage: python scripts/make_tiny_models.py --out .models/tiny

``--dit-dim`` (with ``--dit-blocks``, ``--dit-ffn-dim``, ``--token-dim``, ``--dtype``) writes only the DiT files at
another width, for memory benchmarks: e.g. the Wan 2.1 1.3B shape with image conditioning (dim 1536, 30 blocks,
FFN 8960, emotion tokens of 2048, bf16) gives a 3.1 GB Wan file, a 1.8 GB FlashPortrait overlay and, with
``--complete``, a 3.5 GB FlashPortrait file holding the whole DiT::

    python scripts/make_tiny_models.py --out DIR --dit-dim 1536 --dit-blocks 30 --dit-ffn-dim 8960 \\
        --token-dim 2048 --dtype bfloat16 --complete
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
for _folder in (REPO_ROOT, REPO_ROOT / "scripts"):  # imported by benchmarks too: ComfyUI's `nodes` stays first
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from flashportrait_core.conditioning.prompt_file import save_conditioning_file  # noqa: E402
from flashportrait_core.expression.pdfgc import random_fan_encoder_state_dict  # noqa: E402
from flashportrait_core.conditioning.portrait_encoder import random_portrait_encoder_state_dict  # noqa: E402
from inprocess_host import use_host_in_process  # noqa: E402

# Widths of the tiny models. ComfyUI derives the head count as dim // 128, so 128 is the narrowest DiT.
DIT_DIM = 128
DIT_FFN_DIM = 256
DIT_BLOCKS = 2
TEXT_DIM = 4096  # umT5-XXL width; fixed by the real text encoder
CLIP_DIM = 1280  # ViT-H/14 penultimate width; fixed by the real CLIP vision model
CLIP_TOKENS = 257
FREQ_DIM = 256
LATENT_CHANNELS = 16
I2V_IN_DIM = 36  # 16 noise + 4 mask + 16 reference latent channels
EMOTION_TOKEN_DIM = 64  # output width of the tiny portrait encoder (2048 in the published one)
VAE_DIM = 16


class _CastingDict(dict):
    """A dict that stores every tensor in ``dtype`` as it is set (wide models are drawn one tensor at a time)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value.to(self.dtype))


def _linear(sd: dict, name: str, out_dim: int, in_dim: int, gen: torch.Generator, bias: bool = True) -> None:
    sd[f"{name}.weight"] = torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)
    if bias:
        sd[f"{name}.bias"] = torch.randn(out_dim, generator=gen) * 0.02


def wan_i2v_dit_state_dict(seed: int, dim: int = DIT_DIM, ffn_dim: int = DIT_FFN_DIM,
                           num_blocks: int = DIT_BLOCKS, dtype: torch.dtype = torch.float32
                           ) -> dict[str, torch.Tensor]:
    """A Wan 2.1 I2V DiT with the published key names (as in the official Wan checkpoints), stored in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = _CastingDict(dtype)
    sd["patch_embedding.weight"] = torch.randn(dim, I2V_IN_DIM, 1, 2, 2, generator=gen) / math.sqrt(I2V_IN_DIM * 4)
    sd["patch_embedding.bias"] = torch.zeros(dim)
    _linear(sd, "text_embedding.0", dim, TEXT_DIM, gen)
    _linear(sd, "text_embedding.2", dim, dim, gen)
    _linear(sd, "time_embedding.0", dim, FREQ_DIM, gen)
    _linear(sd, "time_embedding.2", dim, dim, gen)
    _linear(sd, "time_projection.1", dim * 6, dim, gen)
    for i in range(num_blocks):
        p = f"blocks.{i}"
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(sd, f"{p}.{attn}.{proj}", dim, dim, gen)
            sd[f"{p}.{attn}.norm_q.weight"] = torch.ones(dim)
            sd[f"{p}.{attn}.norm_k.weight"] = torch.ones(dim)
        _linear(sd, f"{p}.cross_attn.k_img", dim, dim, gen)
        _linear(sd, f"{p}.cross_attn.v_img", dim, dim, gen)
        sd[f"{p}.cross_attn.norm_k_img.weight"] = torch.ones(dim)
        sd[f"{p}.norm3.weight"] = torch.ones(dim)
        sd[f"{p}.norm3.bias"] = torch.zeros(dim)
        _linear(sd, f"{p}.ffn.0", ffn_dim, dim, gen)
        _linear(sd, f"{p}.ffn.2", dim, ffn_dim, gen)
        sd[f"{p}.modulation"] = torch.randn(1, 6, dim, generator=gen) / math.sqrt(dim)
    _linear(sd, "head.head", LATENT_CHANNELS * 4, dim, gen)
    sd["head.modulation"] = torch.randn(1, 2, dim, generator=gen) / math.sqrt(dim)
    sd["img_emb.proj.0.weight"] = torch.ones(CLIP_DIM)
    sd["img_emb.proj.0.bias"] = torch.zeros(CLIP_DIM)
    _linear(sd, "img_emb.proj.1", CLIP_DIM, CLIP_DIM, gen)
    _linear(sd, "img_emb.proj.3", dim, CLIP_DIM, gen)
    sd["img_emb.proj.4.weight"] = torch.ones(dim)
    sd["img_emb.proj.4.bias"] = torch.zeros(dim)
    return dict(sd)


def flashportrait_overlay_state_dict(seed: int, base: dict[str, torch.Tensor],
                                     token_dim: int = EMOTION_TOKEN_DIM) -> dict[str, torch.Tensor]:
    """The published overlay: fine-tuned attention weights plus per-block emotion projections.

    Attention weights are re-drawn (they differ from the base like a fine-tune does); FFN, embeddings and
    head are absent, so loading must take them from the base model.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = base["head.modulation"].dtype
    overlay = {k: (v + 0.05 * torch.randn(v.shape, generator=gen) * v.float().std().clamp_min(1e-3)).to(dtype)
               for k, v in base.items() if ".self_attn." in k or ".cross_attn." in k}
    dim = base["head.modulation"].shape[-1]
    num_blocks = len({k.split(".")[1] for k in base if k.startswith("blocks.")})
    for i in range(num_blocks):
        for name in ("emo_k_proj", "emo_v_proj"):
            overlay[f"blocks.{i}.cross_attn.{name}.weight"] = (
                torch.randn(dim, token_dim, generator=gen) / math.sqrt(token_dim)).to(dtype)
    return overlay


def step_distill_lora_state_dict(seed: int, base: dict[str, torch.Tensor], rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA in the published ``fast_lora_rank64`` key format, shaped for ``base`` (rank ``rank``).

    ``diffusion_model.<layer>.lora_down.weight`` [rank, in] / ``.lora_up.weight`` [out, rank] on every block
    linear and the head, ``.diff_b`` for their biases, ``.diff`` for the norms, ``blocks.<i>.diff_m`` for the
    modulation. No alpha keys: the published merge applies up @ down unscaled.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, weight in base.items():
        if not (key.startswith("blocks.") or key.startswith("head.")):
            continue
        name = f"diffusion_model.{key[: -len('.weight')] if key.endswith('.weight') else key}"
        if key.endswith(".weight") and weight.ndim == 2:
            out_dim, in_dim = weight.shape
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) / math.sqrt(in_dim)
            sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.05
        elif key.endswith(".weight"):
            sd[f"{name}.diff"] = torch.randn(weight.shape, generator=gen) * 0.01
        elif key.endswith(".bias"):
            sd[f"diffusion_model.{key[: -len('.bias')]}.diff_b"] = torch.randn(weight.shape, generator=gen) * 0.01
        elif key.endswith(".modulation"):
            sd[f"diffusion_model.{key[: -len('.modulation')]}.diff_m"] = torch.randn(weight.shape, generator=gen) * 0.01
    return sd


def wan_vae_state_dict(seed: int, dim: int = VAE_DIM) -> dict[str, torch.Tensor]:
    """A narrow Wan 2.1 VAE. Key names come from the host's own Wan VAE module, which loads the real file."""
    from comfy.ldm.wan.vae import WanVAE  # the host's module defines the published layout

    torch.manual_seed(seed)
    model = WanVAE(dim=dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    sd = {}
    gen = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if key.endswith("gamma"):
            sd[key] = torch.ones_like(value)
        elif key.endswith("bias"):
            sd[key] = torch.zeros_like(value)
        else:
            fan_in = max(1, value[0].numel())
            sd[key] = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
    return sd


def conditioning_tensors(seed: int, text_tokens: int = 16) -> dict[str, torch.Tensor]:
    """Stand-ins for umT5 prompt embeddings and CLIP ViT-H penultimate states, at the real widths."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "positive": torch.randn(1, text_tokens, TEXT_DIM, generator=gen),
        "negative": torch.randn(1, text_tokens, TEXT_DIM, generator=gen),
        "clip_vision_penultimate": torch.randn(1, CLIP_TOKENS, CLIP_DIM, generator=gen),
    }


def write_tiny_models(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny checkpoint under ``out_dir``; returns the written paths by role."""
    use_host_in_process()
    out_dir = Path(out_dir)
    paths = {
        "wan": out_dir / "diffusion_models" / "wan2.1_i2v_tiny.safetensors",
        "transformer_pt": out_dir / "flashportrait" / "transformer_tiny.pt",
        "transformer_safetensors": out_dir / "flashportrait" / "transformer_tiny.safetensors",
        "portrait_encoder": out_dir / "flashportrait" / "portrait_encoder_tiny.safetensors",
        "pd_fgc": out_dir / "flashportrait" / "pd_fpg_tiny.pth",
        "vae": out_dir / "vae" / "wan_2.1_vae_tiny.safetensors",
        "conditioning": out_dir / "flashportrait_conditioning" / "tiny_prompt.safetensors",
        "fast_lora": out_dir / "loras" / "fast_lora_tiny.safetensors",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)

    base = wan_i2v_dit_state_dict(seed)
    save_file(base, str(paths["wan"]))
    overlay = flashportrait_overlay_state_dict(seed + 1, base)
    torch.save({"state_dict": overlay}, paths["transformer_pt"])
    save_file(overlay, str(paths["transformer_safetensors"]))
    save_file(random_portrait_encoder_state_dict(seed + 2, output_dim=EMOTION_TOKEN_DIM),
              str(paths["portrait_encoder"]))
    torch.save(random_fan_encoder_state_dict(seed + 3), paths["pd_fgc"])
    save_file(wan_vae_state_dict(seed + 4), str(paths["vae"]))
    save_file(step_distill_lora_state_dict(seed + 6, base), str(paths["fast_lora"]))
    tensors = conditioning_tensors(seed + 5)
    save_conditioning_file(paths["conditioning"], positive=tensors["positive"], negative=tensors["negative"],
                           clip_vision_penultimate=tensors["clip_vision_penultimate"])
    return paths


_SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def save_safetensors_streaming(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file`` without its in-memory copy of every tensor: header, then each tensor's bytes."""
    header, offset = {}, 0
    for key, tensor in tensors.items():
        header[key] = {"dtype": _SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_dit_checkpoints(out_dir: Path, dim: int, num_blocks: int, ffn_dim: int, token_dim: int,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0, complete: bool = False
                          ) -> dict[str, Path]:
    """Only the DiT files at a chosen width, for memory benchmarks: the Wan base (safetensors), the FlashPortrait
    overlay (torch zip pickle under "state_dict", as published) and, with ``complete``, a FlashPortrait file that
    holds the whole DiT (base with the overlay applied, plus the emotion projections)."""
    stem = f"dim{dim}x{num_blocks}"
    paths = {"wan": out_dir / "diffusion_models" / f"wan2.1_i2v_{stem}.safetensors",
             "transformer": out_dir / "flashportrait" / f"transformer_{stem}.pt"}
    if complete:
        paths["transformer_complete"] = out_dir / "flashportrait" / f"transformer_complete_{stem}.pt"
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    base = wan_i2v_dit_state_dict(seed, dim=dim, ffn_dim=ffn_dim, num_blocks=num_blocks, dtype=dtype)
    save_safetensors_streaming(base, paths["wan"])
    overlay = flashportrait_overlay_state_dict(seed + 1, base, token_dim=token_dim)
    torch.save({"state_dict": overlay}, paths["transformer"])
    if complete:
        base.update(overlay)
        del overlay
        torch.save({"state_dict": base}, paths["transformer_complete"])
    return paths


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".models" / "tiny")
    parser.add_argument("--seed", type=int, default=0)
    wide = parser.add_argument_group("DiT files at another width (no other model is written)")
    wide.add_argument("--dit-dim", type=int, help="DiT width (a multiple of 128; the 14B model has 5120)")
    wide.add_argument("--dit-blocks", type=int, default=DIT_BLOCKS, help="DiT blocks (the 14B model has 40)")
    wide.add_argument("--dit-ffn-dim", type=int, help="FFN width (default 2x the DiT width)")
    wide.add_argument("--token-dim", type=int, default=EMOTION_TOKEN_DIM,
                      help="emotion token width (the published portrait encoder gives 2048)")
    wide.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    wide.add_argument("--complete", action="store_true", help="also a FlashPortrait file holding the whole DiT")
    args = parser.parse_args()
    if args.dit_dim is not None:
        if args.dit_dim % 128 or args.dit_dim <= 0:
            parser.error(f"--dit-dim must be a positive multiple of 128 (ComfyUI uses dim // 128 heads), got "
                         f"{args.dit_dim}")
        written = write_dit_checkpoints(args.out, args.dit_dim, args.dit_blocks, args.dit_ffn_dim or 2 * args.dit_dim,
                                        args.token_dim, _DTYPES[args.dtype], args.seed, args.complete)
    else:
        written = write_tiny_models(args.out, args.seed)
    for role, path in written.items():
        print(f"{role:24s} {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
