"""Per-latent-frame emotion tokens: which frame tokens each latent frame of a clip attends to.

The split below applies to one clip of T frames. The sampler applies it to each sliding window's own frames, as
published (``emotion_conditioning.encode_window_tokens``), not once to the whole video.

The Wan VAE compresses time by 4: video frames T = 4k + 1 give L = k + 1 latent frames, latent frame 0
holding video frame 0 alone and latent frame f >= 1 holding video frames 4f-3 .. 4f. With n tokens per
video frame (24), the frame tokens are flattened to one sequence of T*n tokens, and latent frame f takes
the inclusive token range

    [4nf - 3n - 1,  4nf + n - 1]                      (4n + 1 tokens: 97 for n = 24)

Derivation from the published split (``split_audio_adapter_sequence``): with half = 4n/2 = 2n, latent
frame f >= 1 is centred on token c_f = (n(4f-3) + n(4f+1)) / 2 - 1 = n(4f-1) - 1 and takes
[c_f - 2n, c_f + 2n]; latent frame 0 takes the 4n + 1 tokens ending where latent frame 1 starts, which is
the same formula at f = 0: [-3n-1, n-1]. So latent frame f >= 1 sees its own four frames plus the last
token of the frame before; latent frame 0 sees frame 0 and 3n + 1 positions before the video, which are
zero. For n = 24, T = 9: [-73, 23], [23, 119], [119, 215]. The last range always ends at token T*n - 1.
(The published code reads latent frame 1's range to place latent frame 0's, so it fails for T = 1; the
formula above is its natural extension and gives latent frame 0 its usual range there.)

Zero layout (``split_tensor_with_padding``): a range's real tokens come first, in order, and all zero
tokens of the out-of-range positions are appended after them. Latent frame 0 is therefore
[frame 0's n tokens, then 3n + 1 zeros]. The emotion attention has no positional encoding and leaves
these zeros unmasked, so the layout matters only for exact agreement with the published tensors.
"""
from __future__ import annotations

import torch

#: Video frames per latent frame (the Wan VAE's temporal compression).
TEMPORAL_STRIDE = 4
#: Emotion tokens per video frame in the published model.
TOKENS_PER_FRAME = 24


def trim_to_4k_plus_1(num_frames: int) -> int:
    """The largest frame count 4k + 1 not above ``num_frames`` (how many driving frames to keep)."""
    if num_frames < 1:
        raise ValueError(f"need at least 1 frame, got {num_frames}")
    return num_frames - (num_frames - 1) % TEMPORAL_STRIDE


def num_latent_frames(num_frames: int) -> int:
    """L = (T - 1) / 4 + 1 for T = 4k + 1 video frames; anything else is rejected."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        fix = f"trim to {trim_to_4k_plus_1(num_frames)} frames" if num_frames >= 1 else "give at least 1 frame"
        raise ValueError(
            f"the number of video frames must be 4k+1 (1, 5, 9, ...), got {num_frames}; {fix} "
            f"(trim_to_4k_plus_1)")
    return (num_frames - 1) // TEMPORAL_STRIDE + 1


def tokens_per_latent_frame(tokens_per_frame: int = TOKENS_PER_FRAME) -> int:
    """Window width 4n + 1 (97 for 24 tokens per frame)."""
    return TEMPORAL_STRIDE * tokens_per_frame + 1


def _range_starts(num_latent: int, tokens_per_frame: int) -> torch.Tensor:
    """First flattened-token index of latent frames 0 .. num_latent - 1."""
    f = torch.arange(num_latent, dtype=torch.long)
    return TEMPORAL_STRIDE * tokens_per_frame * f - (TEMPORAL_STRIDE - 1) * tokens_per_frame - 1


def latent_frame_token_ranges(num_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> list[tuple[int, int]]:
    """Inclusive (first, last) flattened-token index of each latent frame's window; may start below 0."""
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame must be at least 1, got {tokens_per_frame}")
    starts = _range_starts(num_latent_frames(num_frames), tokens_per_frame)
    width = tokens_per_latent_frame(tokens_per_frame)
    return [(int(s), int(s) + width - 1) for s in starts]


def _gather_plan(num_frames: int, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source token index [L, W] and a mask [L, W] of positions holding a real token (real tokens first)."""
    num_tokens = num_frames * tokens_per_frame
    width = tokens_per_latent_frame(tokens_per_frame)
    starts = _range_starts(num_latent_frames(num_frames), tokens_per_frame)
    first = starts.clamp(min=0)
    last = (starts + width - 1).clamp(max=num_tokens - 1)
    counts = (last - first + 1).clamp(min=0)
    offsets = torch.arange(width, dtype=torch.long)
    real = offsets[None, :] < counts[:, None]
    index = torch.where(real, first[:, None] + offsets[None, :], torch.zeros((), dtype=torch.long))
    return index, real


def latent_frame_real_token_counts(num_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> torch.Tensor:
    """Real (non-padding) tokens per latent frame, [L] (the published ``k_lens``); informational only."""
    _, real = _gather_plan(num_frames, tokens_per_frame)
    return real.sum(dim=1)


def emotion_tokens_per_latent_frame(frame_tokens: torch.Tensor) -> torch.Tensor:
    """Frame tokens [T, n, D] (or [B, T, n, D]) -> per-latent-frame windows [L, 4n+1, D] (or [B, L, 4n+1, D]).

    One gather with an index tensor; zero tokens fill the positions before the video (see module notes).
    """
    if frame_tokens.ndim not in (3, 4):
        raise ValueError(
            f"frame_tokens must be [frames, tokens, dim] or [batch, frames, tokens, dim], "
            f"got {list(frame_tokens.shape)}")
    num_frames, tokens_per_frame, dim = frame_tokens.shape[-3:]
    index, real = _gather_plan(num_frames, tokens_per_frame)
    num_latent, width = index.shape
    flat = frame_tokens.reshape(*frame_tokens.shape[:-3], num_frames * tokens_per_frame, dim)
    windows = flat.index_select(-2, index.flatten().to(flat.device))
    windows = windows.reshape(*frame_tokens.shape[:-3], num_latent, width, dim)
    return windows.masked_fill_(~real.to(windows.device)[..., None], 0)
