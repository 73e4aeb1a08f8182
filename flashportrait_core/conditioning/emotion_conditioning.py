"""Expression features -> the emotion conditioning the sampler consumes, one token set per latent frame of a window.

As published (``pipeline_wan_long.py``), each sliding window is conditioned on its own frames: a window over
latent frames s..e-1 takes the features of video frames 4s .. 4(e-1), encodes them with the portrait encoder and
splits them over that window's own frame count (``emotion_tokens.emotion_tokens_per_latent_frame``). So every
window's local latent frame 0 holds the 24 tokens of video frame 4s and 73 zeros, exactly like latent frame 0 of
the whole video, and its other latent frames hold 97 real tokens.

The conditioning keeps the driving features ([T, 554], 2.2 KB per frame) and the portrait encoder, and encodes a
window's tokens when the sampler reaches it. Holding the tokens of every window instead would take ~97 x D floats
per latent frame (0.8 MB at the published D = 2048), growing with the video.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .emotion_tokens import TEMPORAL_STRIDE, emotion_tokens_per_latent_frame, num_latent_frames, trim_to_4k_plus_1
from .portrait_encoder import PortraitEncoder, encode_expression_features

#: Frames per encoder batch, on a grid that starts at frame 0. A window encodes the whole grid batches around
#: its frames, so every frame is computed in the same batch (size and position) whichever window asks: CPU matmul
#: kernels differ in the last bits between batch shapes, and overlapping windows must see the same frame tokens.
ENCODE_BATCH_FRAMES = 32


def encode_all_frames(encoder: PortraitEncoder, features: torch.Tensor,
                      output_device: torch.device | str | None = "cpu") -> torch.Tensor:
    """Frame tokens [T, 24, D] of the whole video, batched on the grid ``encode_window_tokens`` uses."""
    return encode_expression_features(encoder, features, ENCODE_BATCH_FRAMES, output_device)


def _encode_grid_batches(encoder: PortraitEncoder, features: torch.Tensor, batches: range,
                         known: dict[int, torch.Tensor], output_device: torch.device | str | None
                         ) -> dict[int, torch.Tensor]:
    """Frame tokens {grid batch index: [<= 32, 24, D]} of ``batches``, reusing those in ``known``. Each batch is
    its own tensor, so a cache of some of them never keeps a larger encoded block alive."""
    return {index: known[index] if index in known else encode_expression_features(
                encoder, features[index * ENCODE_BATCH_FRAMES:(index + 1) * ENCODE_BATCH_FRAMES],
                ENCODE_BATCH_FRAMES, output_device)
            for index in batches}


def window_video_frames(start: int, end: int) -> tuple[int, int]:
    """Video frames [first, stop) a window over latent frames [start, end) is conditioned on: 4s .. 4(e-1)."""
    return TEMPORAL_STRIDE * start, TEMPORAL_STRIDE * (end - 1) + 1


def encode_window_tokens(encoder: PortraitEncoder, features: torch.Tensor, start: int, end: int,
                         output_device: torch.device | str | None = "cpu",
                         batch_cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The published emotion tokens [end - start, 97, D] of a window over latent frames [start, end).

    ``features`` [T, 554] (T = 4k + 1) are the whole video's; the window's video frames 4s .. 4(e-1) are encoded
    and split over the window's own 4(e - s - 1) + 1 frames. ``batch_cache`` ({grid batch index: frame tokens}),
    when given, supplies batches encoded before and is left holding exactly this window's batches: overlapping
    windows visited in turn encode only their new frames.
    """
    if features.ndim != 2:
        raise ValueError(f"expression features must be [frames, 554], got {list(features.shape)}")
    num_latent = num_latent_frames(features.shape[0])
    if not 0 <= start < end <= num_latent:
        raise ValueError(f"latent frame range [{start}, {end}) must be non-empty and within the video's "
                         f"{num_latent} latent frames (0 <= start < end <= {num_latent})")
    first, stop = window_video_frames(start, end)
    batches = range(first // ENCODE_BATCH_FRAMES, -(-stop // ENCODE_BATCH_FRAMES))
    encoded = _encode_grid_batches(encoder, features, batches, batch_cache or {}, output_device)
    if batch_cache is not None:
        batch_cache.clear()
        batch_cache.update(encoded)
    tokens = torch.cat([encoded[index] for index in batches])
    grid_first = batches.start * ENCODE_BATCH_FRAMES
    return emotion_tokens_per_latent_frame(tokens[first - grid_first:stop - grid_first])


def encoder_fingerprint(encoder: PortraitEncoder) -> list:
    """A cheap identity of the encoder's weights: its configuration and a strided sample of every tensor."""
    state = encoder.state_dict()
    sampled = [(name, state[name].detach().flatten()[:: max(1, state[name].numel() // 64)].float().cpu())
               for name in sorted(state)]
    return [repr(encoder.config), sampled]


@dataclass(frozen=True, eq=False)
class EmotionConditioning:
    """Where the emotion tokens come from, plus the guidance settings that go with them.

    Built from ``expression_features`` and ``encoder`` (tokens encoded per window as published, see
    ``window_tokens``), or from precomputed ``latent_tokens`` [L, 97, D] that every window slices as they are
    (tests and hand-made tokens); exactly one of the two.
    """

    num_video_frames: int  # T = 4(L - 1) + 1 driving frames used (trimmed as published)
    ip_scale: float  # strength of the emotion attention in the conditioned pass
    emo_cfg: float  # emotion guidance scale (published default 4)
    text_cfg: float  # text guidance scale (1 = no negative-prompt pass)
    expression_features: torch.Tensor | None = None  # [T, 554] on the CPU
    encoder: PortraitEncoder | None = field(default=None, repr=False)  # the loader's encoder (shared, not copied)
    latent_tokens: torch.Tensor | None = None  # precomputed [L, 97, D] instead of features + encoder
    # The frame tokens of the last window asked for, by encoder batch (bounded by one window: ~4 frames x 24
    # tokens x D per latent frame). The window loop visits the windows in order at every step, so the next
    # window reuses the overlap and encodes only its new frames, and a one-window plan encodes once. A cache
    # of every window would be the whole video's tokens again.
    _batch_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from_features = self.expression_features is not None or self.encoder is not None
        if from_features == (self.latent_tokens is not None) or (from_features and (
                self.expression_features is None or self.encoder is None)):
            raise ValueError("EmotionConditioning needs either expression_features and encoder, or precomputed "
                             "latent_tokens (not both)")
        if self.latent_tokens is not None:
            if self.latent_tokens.ndim != 3 or self.latent_tokens.shape[0] < 1:
                raise ValueError(f"latent_tokens must be [latent frames >= 1, tokens, width], got "
                                 f"{list(self.latent_tokens.shape)}")
            frames = self.latent_tokens.shape[0]
        else:
            if self.expression_features.ndim != 2 or self.expression_features.shape[0] != self.num_video_frames:
                raise ValueError(f"expression_features must be [num_video_frames={self.num_video_frames}, 554], "
                                 f"got {list(self.expression_features.shape)}")
            frames = num_latent_frames(self.num_video_frames)
        if self.num_video_frames != 4 * (frames - 1) + 1:
            raise ValueError(f"num_video_frames {self.num_video_frames} does not match {frames} latent frames "
                             f"(4(L - 1) + 1 = {4 * (frames - 1) + 1})")

    @property
    def num_latent_frames(self) -> int:
        return num_latent_frames(self.num_video_frames)

    @property
    def token_width(self) -> int:
        """D, the width of each emotion token (the model's emotion projections must take it)."""
        if self.latent_tokens is not None:
            return self.latent_tokens.shape[-1]
        return self.encoder.config.output_dim

    def window_tokens(self, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Tokens [end - start, 97, D] of the window over latent frames [start, end), float32 (CPU by default)."""
        if not 0 <= start < end <= self.num_latent_frames:
            raise ValueError(f"latent frame range [{start}, {end}) must be non-empty and within the "
                             f"{self.num_latent_frames} latent frames")
        if self.latent_tokens is not None:
            tokens = self.latent_tokens[start:end]
        else:
            tokens = encode_window_tokens(self.encoder, self.expression_features, start, end,
                                          batch_cache=self._batch_cache)
        return tokens.float().to("cpu" if device is None else device)

    def resume_fingerprint(self) -> list:
        """What the result depends on, for resume keys: the settings and the tokens' source (the features and
        a sample of the encoder's weights, never the tokens of the whole video)."""
        # "per-window split": the token layout; checkpoints of the earlier whole-video split never match.
        settings = [self.num_video_frames, self.ip_scale, self.emo_cfg, self.text_cfg, "per-window split"]
        if self.latent_tokens is not None:
            return [settings, self.latent_tokens]
        return [settings, self.expression_features, encoder_fingerprint(self.encoder)]


def build_emotion_conditioning(encoder: PortraitEncoder, features: torch.Tensor, ip_scale: float = 1.0,
                               emo_cfg: float = 4.0, text_cfg: float = 1.0) -> EmotionConditioning:
    """Trim the driving features to 4k + 1 frames and keep them with the encoder (tokens are made per window)."""
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"expression features must be [frames, 554] with at least one frame, "
                         f"got {list(features.shape)}")
    num_frames = trim_to_4k_plus_1(features.shape[0])
    trimmed = features[:num_frames].detach().to("cpu")  # a view of the caller's features when they are on the CPU
    feature_dim = encoder.config.feature_dim
    if trimmed.shape[1] != feature_dim:
        raise ValueError(f"expression features have {trimmed.shape[1]} values per frame but the portrait encoder "
                         f"takes {feature_dim}; extract them with the PD-FGC expression encoder")
    # Checked in chunks, so that no temporary grows with the video.
    if not all(bool(torch.isfinite(chunk).all()) for chunk in trimmed.split(1024)):
        raise ValueError("expression features hold NaN/Inf; fill frames without a detected face before encoding")
    return EmotionConditioning(num_video_frames=num_frames, ip_scale=float(ip_scale), emo_cfg=float(emo_cfg),
                               text_cfg=float(text_cfg), expression_features=trimmed, encoder=encoder)
