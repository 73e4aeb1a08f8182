"""Portrait encoder: per-frame expression features (554 floats) -> emotion tokens (24 per frame).

Layout of the published ``portrait_encoder.pt`` (FrancisRing/FlashPortrait):

* ``proj_model.``: four bias-free linear projections of the headpose (6), eye (6), emotion (30) and
  mouth (512) parts of a frame's features, each followed by one shared LayerNorm -> 4 tokens.
* ``mouth_proj_model.``: a Perceiver resampler over the mouth feature as a one-token sequence -> 16 tokens.
* ``emo_proj_model.``: the same resampler design over the emotion feature -> 4 tokens.

A frame's tokens are ordered [headpose, eye, emo, mouth | 16 mouth | 4 emo]. Every width is read from
the weights, so the real file (output width 2048, resampler width 1280, depth 4) and small test files
with the same key names go through the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..weights.checkpoints import unwrap_state_dict

#: Names of the four parts of a frame's expression features, in the order they are concatenated.
FEATURE_PARTS: tuple[str, ...] = ("headpose", "eye", "emo", "mouth")
#: Width of one attention head assumed when reading head counts from weights (the published value).
DEFAULT_DIM_HEAD = 64
#: Tokens the shared projection makes per frame (one per feature part).
PROJ_TOKENS_PER_FRAME = 4

#: The parts of the encoder in a checkpoint; the published loader reads these three prefixes and nothing else.
ENCODER_PREFIXES: tuple[str, ...] = ("proj_model.", "mouth_proj_model.", "emo_proj_model.")
_EXPECTED_FILE = "FlashPortrait's portrait_encoder.pt (keys under proj_model., mouth_proj_model., emo_proj_model.)"


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ResamplerConfig:
    """Shape of one Perceiver resampler (``mouth_proj_model`` or ``emo_proj_model``)."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int

    @property
    def inner_dim(self) -> int:
        return self.dim_head * self.heads


@dataclass(frozen=True)
class PortraitEncoderConfig:
    """Shape of the whole portrait encoder."""

    output_dim: int
    headpose_dim: int
    eye_dim: int
    emo_dim: int
    mouth_dim: int
    mouth: ResamplerConfig
    emo: ResamplerConfig

    @property
    def feature_dim(self) -> int:
        """Length of one frame's expression feature vector (554 for the published model)."""
        return self.headpose_dim + self.eye_dim + self.emo_dim + self.mouth_dim

    @property
    def feature_split(self) -> tuple[int, int, int, int]:
        return (self.headpose_dim, self.eye_dim, self.emo_dim, self.mouth_dim)

    @property
    def tokens_per_frame(self) -> int:
        """Emotion tokens per video frame (24 for the published model)."""
        return PROJ_TOKENS_PER_FRAME + self.mouth.num_queries + self.emo.num_queries


def _published_resampler(num_queries: int, embedding_dim: int) -> ResamplerConfig:
    return ResamplerConfig(dim=1280, depth=4, dim_head=64, heads=20, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=2048, ff_mult=4)


#: The configuration of the published checkpoint (for reference and size checks; loading reads the weights).
PUBLISHED_PORTRAIT_ENCODER_CONFIG = PortraitEncoderConfig(
    output_dim=2048, headpose_dim=6, eye_dim=6, emo_dim=30, mouth_dim=512,
    mouth=_published_resampler(num_queries=16, embedding_dim=512),
    emo=_published_resampler(num_queries=4, embedding_dim=30),
)


# --------------------------------------------------------------------------------------------------
# Modules (attribute names mirror the published key names)


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs, latents]; keys ``norm1, norm2, to_q, to_kv, to_out``."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, num_latents, _ = latents.shape
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # q and k are each scaled by dim_head^-1/4 (rather than the product by dim_head^-1/2) so that
        # half-precision logits stay in range; the softmax itself runs in float32.
        scale = self.dim_head ** -0.25
        logits = (q * scale) @ (k * scale).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = (weights @ v).transpose(1, 2).reshape(batch, num_latents, self.heads * self.dim_head)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear(dim -> dim*mult), GELU, Linear(back): keys ``0.*``, ``1.weight``, ``3.weight``."""
    hidden = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden, bias=False),
        nn.GELU(),
        nn.Linear(hidden, dim, bias=False),
    )


class Resampler(nn.Module):
    """Perceiver resampler: ``num_queries`` learned latents read an input sequence through ``depth`` layers."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, config.dim) / config.dim ** 0.5)
        self.proj_in = nn.Linear(config.embedding_dim, config.dim)
        self.proj_out = nn.Linear(config.dim, config.output_dim)
        self.norm_out = nn.LayerNorm(config.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(config.dim, config.dim_head, config.heads),
                feed_forward(config.dim, config.ff_mult),
            ])
            for _ in range(config.depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, embedding_dim] -> [B, num_queries, output_dim]."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ExpressionProjection(nn.Module):
    """The ``proj_model``: one token per feature part, all normalised by the same LayerNorm."""

    def __init__(self, config: PortraitEncoderConfig) -> None:
        super().__init__()
        self.feature_split = config.feature_split
        self.headpose_proj = nn.Linear(config.headpose_dim, config.output_dim, bias=False)
        self.eye_proj = nn.Linear(config.eye_dim, config.output_dim, bias=False)
        self.emo_proj = nn.Linear(config.emo_dim, config.output_dim, bias=False)
        self.mouth_proj = nn.Linear(config.mouth_dim, config.output_dim, bias=False)
        self.norm = nn.LayerNorm(config.output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [N, feature_dim] -> [N, 4, output_dim] in the order headpose, eye, emo, mouth."""
        headpose, eye, emo, mouth = torch.split(features, self.feature_split, dim=-1)
        projections = (self.headpose_proj, self.eye_proj, self.emo_proj, self.mouth_proj)
        tokens = [self.norm(project(part)) for project, part in zip(projections, (headpose, eye, emo, mouth))]
        return torch.stack(tokens, dim=-2)


class PortraitEncoder(nn.Module):
    """Expression features [N, 554] -> emotion tokens [N, 24, D] ([4 proj | 16 mouth | 4 emo])."""

    def __init__(self, config: PortraitEncoderConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.proj_model = ExpressionProjection(config)
        self.mouth_proj_model = Resampler(config.mouth)
        self.emo_proj_model = Resampler(config.emo)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, _, emo, mouth = torch.split(features, self.config.feature_split, dim=-1)
        proj_tokens = self.proj_model(features)
        # Each frame's mouth / emotion feature is a one-token sequence for its resampler.
        mouth_tokens = self.mouth_proj_model(mouth.unsqueeze(-2))
        emo_tokens = self.emo_proj_model(emo.unsqueeze(-2))
        return torch.cat([proj_tokens, mouth_tokens, emo_tokens], dim=-2)


def _check_config(config: PortraitEncoderConfig) -> None:
    for name, resampler, part_dim in (("mouth", config.mouth, config.mouth_dim), ("emo", config.emo, config.emo_dim)):
        if resampler.output_dim != config.output_dim:
            raise ValueError(
                f"{name} resampler output width {resampler.output_dim} differs from the projection width "
                f"{config.output_dim}; all emotion tokens of a frame must share one width")
        if resampler.embedding_dim != part_dim:
            raise ValueError(
                f"{name} resampler reads {resampler.embedding_dim}-d input but the {name} feature part is "
                f"{part_dim}-d; the weights do not belong together")


# --------------------------------------------------------------------------------------------------
# Reading the configuration from weights, loading


def heads_from_inner_dim(inner_dim: int, dim_head: int = DEFAULT_DIM_HEAD) -> tuple[int, int]:
    """(heads, dim_head) for an attention of total width ``inner_dim``.

    Weights fix only heads * dim_head, so the head width is taken as ``dim_head`` (64, as published):
    heads = inner_dim / dim_head. A width below one head (inner_dim < dim_head) is read as a single head
    of width inner_dim. Any other width that is not a multiple of dim_head is ambiguous and rejected.
    """
    if inner_dim <= 0:
        raise ValueError(f"attention width must be positive, got {inner_dim}")
    if inner_dim < dim_head:
        return 1, inner_dim
    if inner_dim % dim_head:
        raise ValueError(
            f"attention width {inner_dim} is not a multiple of the head width {dim_head}; pass the "
            f"dim_head the weights were trained with")
    return inner_dim // dim_head, dim_head


def _tensor(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        prefixes = sorted({k.split(".", 1)[0] for k in state_dict})[:8]
        raise ValueError(
            f"weights have no '{key}'; expected {_EXPECTED_FILE}. Top-level prefixes found: {prefixes}")
    return state_dict[key]


def _resampler_config_from_state_dict(state_dict: dict[str, torch.Tensor], prefix: str,
                                      dim_head: int) -> ResamplerConfig:
    latents = _tensor(state_dict, f"{prefix}latents")
    if latents.ndim != 3 or latents.shape[0] != 1:
        raise ValueError(f"'{prefix}latents' should be [1, queries, dim], got {list(latents.shape)}")
    _, num_queries, dim = latents.shape
    embedding_dim = _tensor(state_dict, f"{prefix}proj_in.weight").shape[1]
    output_dim = _tensor(state_dict, f"{prefix}proj_out.weight").shape[0]
    layer_ids = {int(k[len(prefix) + len("layers."):].split(".", 1)[0])
                 for k in state_dict if k.startswith(f"{prefix}layers.")}
    depth = len(layer_ids)
    if layer_ids != set(range(depth)):
        raise ValueError(f"'{prefix}layers.*' indices are not 0..{depth - 1}: {sorted(layer_ids)}")
    if depth == 0:
        raise ValueError(f"weights have no '{prefix}layers.*'; expected {_EXPECTED_FILE}")
    inner_dim = _tensor(state_dict, f"{prefix}layers.0.0.to_q.weight").shape[0]
    heads, head_width = heads_from_inner_dim(inner_dim, dim_head)
    hidden = _tensor(state_dict, f"{prefix}layers.0.1.1.weight").shape[0]
    if hidden % dim:
        raise ValueError(f"feed-forward width {hidden} of '{prefix}' is not a multiple of its width {dim}")
    return ResamplerConfig(dim=dim, depth=depth, dim_head=head_width, heads=heads, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=hidden // dim)


def portrait_encoder_config_from_state_dict(state_dict: dict,
                                            dim_head: int = DEFAULT_DIM_HEAD) -> PortraitEncoderConfig:
    """Read every width of the portrait encoder from its weights (see ``heads_from_inner_dim`` for heads)."""
    state_dict = unwrap_state_dict(state_dict)
    part_dims = {part: _tensor(state_dict, f"proj_model.{part}_proj.weight").shape for part in FEATURE_PARTS}
    output_dims = {shape[0] for shape in part_dims.values()}
    if len(output_dims) != 1:
        raise ValueError(f"proj_model projections disagree on their output width: {part_dims}")
    config = PortraitEncoderConfig(
        output_dim=output_dims.pop(),
        headpose_dim=part_dims["headpose"][1], eye_dim=part_dims["eye"][1],
        emo_dim=part_dims["emo"][1], mouth_dim=part_dims["mouth"][1],
        mouth=_resampler_config_from_state_dict(state_dict, "mouth_proj_model.", dim_head),
        emo=_resampler_config_from_state_dict(state_dict, "emo_proj_model.", dim_head),
    )
    _check_config(config)
    return config


def split_portrait_encoder_keys(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the encoder's weights, the other keys) of a checkpoint: as published, only keys under
    ``proj_model.``/``mouth_proj_model.``/``emo_proj_model.`` belong to the encoder; any other key is ignored."""
    state_dict = unwrap_state_dict(state_dict)
    kept = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}
    return kept, sorted(state_dict.keys() - kept.keys())


def load_portrait_encoder(state_dict: dict, dim_head: int = DEFAULT_DIM_HEAD) -> PortraitEncoder:
    """Build a portrait encoder shaped by ``state_dict`` and load it in eval mode.

    Keys outside the three encoder prefixes are ignored (``split_portrait_encoder_keys``), as the published loader
    does; within them the load is strict, like the published per-part ``load_state_dict``. The module is built on
    the meta device and takes the given tensors as its parameters (no second copy of the weights, tensors keep
    their dtype and device).
    """
    state_dict, ignored = split_portrait_encoder_keys(state_dict)
    if not state_dict:
        prefixes = sorted({k.split(".", 1)[0] for k in ignored})[:8]
        raise ValueError(f"weights have no key of {_EXPECTED_FILE}; top-level prefixes found: {prefixes}")
    config = portrait_encoder_config_from_state_dict(state_dict, dim_head)
    with torch.device("meta"):
        encoder = PortraitEncoder(config)
    expected = set(encoder.state_dict().keys())
    missing = sorted(expected - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not match {_EXPECTED_FILE}: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
    encoder.load_state_dict(state_dict, strict=True, assign=True)
    return encoder.eval()


def count_parameters(config: PortraitEncoderConfig) -> int:
    """Number of weights of an encoder of this shape, counted without allocating them."""
    with torch.device("meta"):
        encoder = PortraitEncoder(config)
    return sum(p.numel() for p in encoder.parameters())


# --------------------------------------------------------------------------------------------------
# Test weights


def random_portrait_encoder_state_dict(
    seed: int = 0,
    output_dim: int = 64,
    resampler_dim: int = 64,
    depth: int = 2,
    heads: int = 2,
    dim_head: int = DEFAULT_DIM_HEAD,
    ff_mult: int = 4,
    mouth_queries: int = 16,
    emo_queries: int = 4,
) -> dict[str, torch.Tensor]:
    """Small random weights in the published format (same key names, same feature widths 6/6/30/512).

    Values are deterministic in ``seed`` and scaled so activations stay O(1); LayerNorm scales and biases
    are perturbed away from identity so that every parameter matters. ``heads`` and ``dim_head`` must be
    readable back by ``heads_from_inner_dim`` (dim_head 64, or one head narrower than 64).
    """
    if heads_from_inner_dim(heads * dim_head) != (heads, dim_head):
        raise ValueError(
            f"heads={heads}, dim_head={dim_head} cannot be read back from weights; use dim_head=64, "
            f"or heads=1 with dim_head < 64")
    published = PUBLISHED_PORTRAIT_ENCODER_CONFIG

    def resampler(num_queries: int, embedding_dim: int) -> ResamplerConfig:
        return ResamplerConfig(dim=resampler_dim, depth=depth, dim_head=dim_head, heads=heads,
                               num_queries=num_queries, embedding_dim=embedding_dim,
                               output_dim=output_dim, ff_mult=ff_mult)

    config = PortraitEncoderConfig(
        output_dim=output_dim, headpose_dim=published.headpose_dim, eye_dim=published.eye_dim,
        emo_dim=published.emo_dim, mouth_dim=published.mouth_dim,
        mouth=resampler(mouth_queries, published.mouth_dim), emo=resampler(emo_queries, published.emo_dim))
    with torch.device("meta"):
        template = PortraitEncoder(config)
    shapes = {name: tuple(t.shape) for name, t in template.state_dict().items()}
    norm_weights = {f"{name}.weight" for name, module in template.named_modules()
                    if isinstance(module, nn.LayerNorm)}

    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=generator)
        if name.endswith("latents"):
            value = noise / math.sqrt(shape[-1])
        elif name in norm_weights:
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.02 * noise
        else:  # linear weight [out, in]
            value = noise / math.sqrt(shape[1])
        state_dict[name] = value.contiguous()
    return state_dict


# --------------------------------------------------------------------------------------------------
# Running


def encode_expression_features(
    encoder: PortraitEncoder,
    features: torch.Tensor,
    batch_size: int = 256,
    output_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Expression features [T, 554] -> emotion tokens [T, 24, D], ``batch_size`` frames at a time.

    Runs in inference mode on the encoder's device and dtype; the result is written into one
    preallocated tensor (on ``output_device``, default the encoder's device), so working memory is
    bounded by the batch however long the video.
    """
    config = encoder.config
    if features.ndim != 2 or features.shape[1] != config.feature_dim:
        raise ValueError(
            f"features must be [frames, {config.feature_dim}] (headpose {config.headpose_dim} | eye "
            f"{config.eye_dim} | emo {config.emo_dim} | mouth {config.mouth_dim}), got {list(features.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).any(dim=1).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"features hold NaN/inf in frames {bad}...; fill frames without a detected face "
            f"(e.g. interpolate from neighbours) before encoding")
    parameter = next(encoder.parameters())
    device, dtype = parameter.device, parameter.dtype
    output_device = device if output_device is None else torch.device(output_device)
    num_frames = features.shape[0]
    # Allocated outside inference mode so callers may modify the result in place.
    tokens = torch.empty(num_frames, config.tokens_per_frame, config.output_dim, dtype=dtype, device=output_device)
    with torch.inference_mode():
        for start in range(0, num_frames, batch_size):
            batch = features[start:start + batch_size].to(device=device, dtype=dtype)
            tokens[start:start + batch.shape[0]] = encoder(batch).to(output_device)
    return tokens
