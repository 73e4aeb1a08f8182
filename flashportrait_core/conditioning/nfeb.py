"""Normalized Facial Expression Block: the emotion branch inside each DiT block's cross-attention.

The latent tokens of latent frame f attend only to that frame's emotion tokens (frame-local attention).
The result is renormalized to the mean and standard deviation of the text + image attention output it is
added to, so the expression signal cannot overpower or vanish next to the other conditionings.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5

# attention(q, k, v, heads) over [N, tokens, heads * head_dim] tensors -> [N, q tokens, heads * head_dim]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Exact multi-head softmax attention (PyTorch's scaled_dot_product_attention), heads packed in channels."""
    batch, q_len, channels = q.shape
    head_dim = channels // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, q_len, channels)


def frame_local_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          heads: int, attention: Attention = sdpa_attention) -> torch.Tensor:
    """Attention of each latent frame's tokens to that frame's emotion tokens only.

    queries: [B, L * n, C] (frame-major latent tokens, n per frame); keys, values: [B, L, M, C].
    Returns [B, L * n, C]. Zero keys (the published zero padding) take part with logit 0, unmasked.
    Frames become batch entries of one ``attention`` call (any exact softmax attention, e.g. the host's).
    """
    batch, seq, channels = queries.shape
    frames, tokens = keys.shape[1], keys.shape[2]
    if seq % frames != 0:
        raise ValueError(f"{seq} latent tokens cannot be split evenly over {frames} latent frames of "
                         f"emotion tokens; the emotion conditioning must match the window's latent frames")
    per_frame = seq // frames
    out = attention(queries.reshape(batch * frames, per_frame, channels),
                    keys.reshape(batch * frames, tokens, channels),
                    values.reshape(batch * frames, tokens, channels), heads)
    return out.reshape(batch, seq, channels)


def match_statistics(emotion: torch.Tensor, target: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Shift and scale ``emotion`` to the per-sample mean and (unbiased) std of ``target``.

    Statistics run over tokens and channels of each sample, in float32 for stability in half precision.
    """
    dims = tuple(range(1, emotion.ndim))
    e = emotion.float()
    t = target.float()
    e_mean, e_std = e.mean(dims, keepdim=True), e.std(dims, keepdim=True)
    t_mean, t_std = t.mean(dims, keepdim=True), t.std(dims, keepdim=True)
    return ((e - e_mean) * t_std / (e_std + eps) + t_mean).to(emotion.dtype)


def add_normalized_emotion(attention_sum: torch.Tensor, emotion: torch.Tensor,
                           ip_scale: float | torch.Tensor) -> torch.Tensor:
    """s + ip_scale * normalize(e, s), with s = text + image attention before the output projection.

    ``ip_scale`` is a number or a per-sample tensor [B].
    """
    if torch.is_tensor(ip_scale) and ip_scale.ndim == 1:
        ip_scale = ip_scale.reshape(-1, *([1] * (attention_sum.ndim - 1))).to(attention_sum)
    return attention_sum + ip_scale * match_statistics(emotion, attention_sum)
