"""Expression features -> the emotion conditioning the sampler consumes, one token window per latent frame."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .emotion_tokens import emotion_tokens_per_latent_frame, trim_to_4k_plus_1
from .portrait_encoder import PortraitEncoder, encode_expression_features


@dataclass(frozen=True)
class EmotionConditioning:
    """Emotion tokens per latent frame plus the guidance settings that go with them."""

    latent_tokens: torch.Tensor  # [L, 97, D]: latent frame f's token window (zero padded before the video)
    num_video_frames: int  # T = 4(L - 1) + 1 driving frames used (trimmed as published)
    ip_scale: float  # strength of the emotion attention in the conditioned pass
    emo_cfg: float  # emotion guidance scale (published default 4)
    text_cfg: float  # text guidance scale (1 = no negative-prompt pass)

    @property
    def num_latent_frames(self) -> int:
        return self.latent_tokens.shape[0]


def build_emotion_conditioning(encoder: PortraitEncoder, features: torch.Tensor, ip_scale: float = 1.0,
                               emo_cfg: float = 4.0, text_cfg: float = 1.0) -> EmotionConditioning:
    """Trim the driving features to 4k + 1 frames, encode them and split the tokens per latent frame."""
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"expression features must be [frames, 554] with at least one frame, "
                         f"got {list(features.shape)}")
    num_frames = trim_to_4k_plus_1(features.shape[0])
    frame_tokens = encode_expression_features(encoder, features[:num_frames], output_device="cpu")
    return EmotionConditioning(latent_tokens=emotion_tokens_per_latent_frame(frame_tokens).float(),
                               num_video_frames=num_frames, ip_scale=float(ip_scale),
                               emo_cfg=float(emo_cfg), text_cfg=float(text_cfg))
