"""FlashPortrait's emotion attention inside ComfyUI's native Wan 2.1 model, without forking its code.

The per-block emotion projections become submodules of each block's cross-attention (so ComfyUI's memory
management, dtype casting and LoRA key mapping see them like any other weight), and each cross-attention becomes an
``EmotionI2VCrossAttention``: ComfyUI's Wan I2V cross-attention, plus the NFEB branch when the pass's
``transformer_options`` carry emotion tokens. A permanent subclass rather than a per-call swap of ``forward``, so
``torch.compile`` (ComfyUI's TorchCompileModel) traces the emotion branch like the rest of the block.

The host's per-block replacement hook (``patches_replace["dit"][("double_block", i)]``) only records block outputs
when ALP's layer dial asks for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.wan.model import WanI2VCrossAttention

from ..flashportrait_core.conditioning.nfeb import add_normalized_emotion, frame_local_attention

# Keys in ``transformer_options``: a pass's emotion conditioning, and a probe asking for block outputs.
EMOTION_OPTIONS_KEY = "flashportrait_emotion"
BLOCK_PROBE_KEY = "flashportrait_block_probe"


@dataclass(frozen=True)
class EmotionPass:
    """Emotion conditioning of the model passes of one window: tokens [1, L, M, D] for its L latent frames, and
    the strength of each pass by its index in the conditions ComfyUI batches (``cond_or_uncond``).

    Passes batched into one model call share the tokens; a pass at ip_scale 0 (no_emo, no_cond) is the plain Wan
    block for its batch entries. A single float ``ip_scales`` applies to every entry.
    """

    tokens: torch.Tensor
    ip_scales: tuple[float, ...] | float

    def batch_scales(self, batch: int, cond_or_uncond: list[int] | None) -> torch.Tensor:
        """ip_scale of each of the ``batch`` entries (chunks of equal size, one per entry of cond_or_uncond)."""
        if isinstance(self.ip_scales, (int, float)):
            return torch.full((batch,), float(self.ip_scales))
        passes = cond_or_uncond if cond_or_uncond else [0]
        per_pass = batch // len(passes)
        return torch.tensor([float(self.ip_scales[index]) for index in passes]).repeat_interleave(per_pass)


@dataclass
class BlockProbe:
    """Asks the patched blocks for a strided sample of their outputs (for ALP's layer-aware dial).

    The dial needs each block's relative change between computed steps, which a sample of tokens and channels
    estimates well; ALP keeps the sample of every window for the whole run, so it must stay small (at most
    1024 tokens x 64 channels: 256 KB a block, where whole tokens at width 5120 would be 20 MB).
    """

    blocks: tuple[int, ...]
    max_tokens: int = 1024
    max_channels: int = 64
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, index: int, output: torch.Tensor) -> None:
        if index in self.blocks:
            token_stride = -(-output.shape[1] // self.max_tokens)  # ceil: at most max_tokens kept
            channel_stride = -(-output.shape[2] // self.max_channels)
            self.outputs[index] = output[:, ::token_stride, ::channel_stride].detach().float().cpu()


def attach_emotion_projections(diffusion_model: torch.nn.Module,
                               projections: dict[int, dict[str, torch.Tensor]]) -> None:
    """Add ``blocks.{i}.cross_attn.emo_{k,v}_proj`` (Linear, no bias) built with the model's own operations, and
    make each cross-attention an ``EmotionI2VCrossAttention``."""
    for index, block in enumerate(diffusion_model.blocks):
        cross_attn = block.cross_attn
        if not isinstance(cross_attn, WanI2VCrossAttention):
            raise TypeError(f"block {index} has {type(cross_attn).__name__}, not Wan's image-to-video "
                            f"cross-attention: FlashPortrait needs a Wan 2.1 I2V model")
        linear_cls = type(cross_attn.k)  # the host's ops class: handles casting, offload, fp8 weights
        weight_dtype = cross_attn.k.weight.dtype
        for name in ("emo_k_proj", "emo_v_proj"):
            weight = projections[index][name]
            layer = linear_cls(weight.shape[1], weight.shape[0], bias=False, device="cpu", dtype=weight_dtype)
            layer.weight = torch.nn.Parameter(weight.to(weight_dtype), requires_grad=False)
            setattr(cross_attn, name, layer)
        cross_attn.__class__ = EmotionI2VCrossAttention


def emotion_cross_attention(attn: torch.nn.Module, x: torch.Tensor, context: torch.Tensor,
                            context_img_len: int, tokens: torch.Tensor, ip_scale: torch.Tensor | float,
                            transformer_options: dict | None = None) -> torch.Tensor:
    """Wan I2V cross-attention (text + CLIP image) plus the normalized frame-local emotion attention.

    Every attention goes through ComfyUI's ``optimized_attention``, so the attention backend chosen at start-up
    (sage, flash, xformers, PyTorch) runs the emotion attention too.
    """
    transformer_options = transformer_options or {}
    context_img, context_text = context[:, :context_img_len], context[:, context_img_len:]
    q = attn.norm_q(attn.q(x))
    text = optimized_attention(q, attn.norm_k(attn.k(context_text)), attn.v(context_text),
                               heads=attn.num_heads, transformer_options=transformer_options)
    image = optimized_attention(q, attn.norm_k_img(attn.k_img(context_img)), attn.v_img(context_img),
                                heads=attn.num_heads, transformer_options=transformer_options)
    attention_sum = text + image
    tokens = tokens.to(device=x.device, dtype=x.dtype).expand(x.shape[0], *tokens.shape[1:])

    def host_attention(q_frames, k_frames, v_frames, heads):
        return optimized_attention(q_frames, k_frames, v_frames, heads=heads, transformer_options=transformer_options)

    emotion_out = frame_local_attention(q, attn.emo_k_proj(tokens), attn.emo_v_proj(tokens), attn.num_heads,
                                        host_attention)
    return attn.o(add_normalized_emotion(attention_sum, emotion_out, ip_scale))


class EmotionI2VCrossAttention(WanI2VCrossAttention):
    """Wan's I2V cross-attention with the NFEB branch for passes whose options carry emotion tokens."""

    def forward(self, x, context, context_img_len, transformer_options={}):
        emotion = transformer_options.get(EMOTION_OPTIONS_KEY)
        if emotion is None:
            return super().forward(x, context, context_img_len, transformer_options=transformer_options)
        scales = emotion.batch_scales(x.shape[0], transformer_options.get("cond_or_uncond"))
        if not bool(scales.ne(0).any()):
            return super().forward(x, context, context_img_len, transformer_options=transformer_options)
        ip_scale = float(scales[0]) if bool(scales.eq(scales[0]).all()) else scales
        return emotion_cross_attention(self, x, context, context_img_len, emotion.tokens, ip_scale,
                                       transformer_options)


class BlockProbePatch:
    """Replacement for one Wan block: the original block, whose output is recorded when a probe asks for it."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, args: dict, extra: dict) -> dict:
        out = extra["original_block"](args)
        options = args["transformer_options"]
        probe = options.get(BLOCK_PROBE_KEY)
        if probe is not None:
            probe.record(self.index, out["img"][self._probed_entries(out["img"].shape[0], options)])
        return out

    @staticmethod
    def _probed_entries(batch: int, options: dict) -> slice:
        """The batch entries of the conditioned pass (condition index 0), which ALP's layer dial follows."""
        passes = options.get("cond_or_uncond") or [0]
        per_pass = batch // len(passes)
        first = passes.index(0) if 0 in passes else 0
        return slice(first * per_pass, (first + 1) * per_pass)


def patch_emotion_blocks(model_patcher) -> None:
    """Register the block-output probe on every block of a ModelPatcher's Wan model (for ALP's layer dial)."""
    for index, _ in enumerate(model_patcher.model.diffusion_model.blocks):
        model_patcher.set_model_patch_replace(BlockProbePatch(index), "dit", "double_block", index)
