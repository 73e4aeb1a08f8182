"""NFEB inside ComfyUI's Wan model, checked against a plain, independent reading of the published formula."""
from __future__ import annotations

import math

import pytest
import torch

from flashportrait_core.conditioning.nfeb import add_normalized_emotion, frame_local_attention, match_statistics
from pack import import_pack

pack = import_pack()
from comfy.ldm.wan.model import WanAttentionBlock  # noqa: E402  (importable once the pack is loaded)
import comfy.ops  # noqa: E402

wan_patch = pack.nodes.wan_patch


def naive_frame_local_attention(q, k, v, heads):
    """Loop over samples, frames and heads; softmax(q k^T / sqrt(d)) v in float64."""
    batch, seq, channels = q.shape
    frames = k.shape[1]
    per_frame, head_dim = seq // frames, channels // heads
    out = torch.zeros(batch, seq, channels, dtype=torch.float64)
    for b in range(batch):
        for f in range(frames):
            rows = slice(f * per_frame, (f + 1) * per_frame)
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                qh = q[b, rows, cols].double()
                kh, vh = k[b, f, :, cols].double(), v[b, f, :, cols].double()
                weights = torch.softmax(qh @ kh.T / math.sqrt(head_dim), dim=-1)
                out[b, rows, cols] = weights @ vh
    return out


def naive_nfeb_mix(s, e, ip_scale):
    """s + ip_scale * ((e - mean e) * std s / (std e + 1e-5) + mean s), statistics per sample (unbiased)."""
    out = torch.empty_like(s, dtype=torch.float64)
    for b in range(s.shape[0]):
        sb, eb = s[b].double(), e[b].double()
        n = sb.numel()
        s_mean, e_mean = sb.sum() / n, eb.sum() / n
        s_std = torch.sqrt(((sb - s_mean) ** 2).sum() / (n - 1))
        e_std = torch.sqrt(((eb - e_mean) ** 2).sum() / (n - 1))
        out[b] = sb + ip_scale * ((eb - e_mean) * s_std / (e_std + 1e-5) + s_mean)
    return out


def test_frame_local_attention_matches_naive_loops():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3 * 5, 8, generator=gen)
    k = torch.randn(2, 3, 7, 8, generator=gen)
    v = torch.randn(2, 3, 7, 8, generator=gen)
    out = frame_local_attention(q, k, v, heads=2)
    assert torch.allclose(out.double(), naive_frame_local_attention(q, k, v, 2), atol=1e-5)


def test_frame_local_attention_keeps_frames_apart():
    """Changing frame 1's emotion tokens must leave frame 0's outputs untouched."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2 * 4, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen), torch.randn(
        1, 2, 5, 8, generator=gen)
    base = frame_local_attention(q, k, v, heads=1)
    k2 = k.clone()
    k2[:, 1] = torch.randn(5, 8, generator=gen)  # a constant shift would cancel in the softmax
    moved = frame_local_attention(q, k2, v, heads=1)
    assert torch.equal(base[:, :4], moved[:, :4])
    assert not torch.allclose(base[:, 4:], moved[:, 4:])


def test_normalized_mix_matches_formula_and_target_statistics():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 40, 16, generator=gen) * 3 + 1
    e = torch.randn(2, 40, 16, generator=gen) * 0.1 - 4
    mixed = add_normalized_emotion(s, e, 0.8)
    assert torch.allclose(mixed.double(), naive_nfeb_mix(s, e, 0.8), atol=1e-5)
    matched = match_statistics(e, s)
    assert torch.allclose(matched.mean(dim=(1, 2)), s.mean(dim=(1, 2)), atol=1e-5)
    assert torch.allclose(matched.std(dim=(1, 2)), s.std(dim=(1, 2)), rtol=1e-3)  # eps 1e-5 vs std 0.1
    per_sample = add_normalized_emotion(s, e, torch.tensor([0.0, 0.8]))
    assert torch.equal(per_sample[0], s[0])


def _random_block(dim=256, heads=2, ffn=512, token_dim=32, seed=3):
    torch.manual_seed(seed)
    block = WanAttentionBlock("i2v_cross_attn", dim, ffn, heads, qk_norm=True, cross_attn_norm=True,
                              operation_settings={"operations": comfy.ops.disable_weight_init})
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / math.sqrt(param.shape[-1]))
    projections = {0: {"emo_k_proj": torch.randn(dim, token_dim) / math.sqrt(token_dim),
                       "emo_v_proj": torch.randn(dim, token_dim) / math.sqrt(token_dim)}}

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([block])

    wan_patch.attach_emotion_projections(Holder(), projections)
    return block.eval(), projections[0]


def _block_inputs(dim, frames=3, per_frame=4, tokens=6, token_dim=32, batch=2, seed=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames * per_frame, dim, generator=gen)
    e = torch.randn(batch, 6, dim, generator=gen) * 0.1
    head_dim = dim // 2
    freqs = torch.zeros(1, frames * per_frame, 1, head_dim // 2, 2, 2)  # identity rotation
    freqs[..., 0, 0] = 1.0
    freqs[..., 1, 1] = 1.0
    context = torch.randn(batch, 257 + 10, dim, generator=gen)
    emotion_tokens = torch.randn(batch, frames, tokens, token_dim, generator=gen)
    return x, e, freqs, context, emotion_tokens


def _run_patched(block, x, e, freqs, context, emotion):
    """The block as ComfyUI's Wan model calls it, with a pass's options (emotion tokens or none)."""
    options = {wan_patch.EMOTION_OPTIONS_KEY: emotion} if emotion is not None else {}
    return block(x, e=e, freqs=freqs, context=context, context_img_len=257, transformer_options=options)


@torch.no_grad()
def test_ip_scale_zero_is_exactly_the_plain_wan_block():
    block, _ = _random_block()
    x, e, freqs, context, tokens = _block_inputs(256)
    plain = block(x, e=e, freqs=freqs, context=context, context_img_len=257)
    zero = _run_patched(block, x, e, freqs, context, wan_patch.EmotionPass(tokens, 0.0))
    assert torch.equal(plain, zero)
    assert isinstance(block.cross_attn, wan_patch.EmotionI2VCrossAttention)  # the loader's permanent subclass


@torch.no_grad()
def test_patched_block_matches_independent_published_formula():
    block, proj = _random_block()
    x, e, freqs, context, tokens = _block_inputs(256)
    ip_scale = 0.7
    patched = _run_patched(block, x, e, freqs, context, wan_patch.EmotionPass(tokens, ip_scale))

    # Independent reading: Wan block with cross-attention o(s + ip_scale * normalize(e, s)).
    attn = block.cross_attn
    mod = (block.modulation + e).chunk(6, dim=1)
    y = block.self_attn(block.norm1(x) * (1 + mod[1]) + mod[0], freqs)
    h = x + y * mod[2]
    hn = block.norm3(h)
    q = attn.norm_q(attn.q(hn))
    img, txt = context[:, :257], context[:, 257:]

    def softmax_attention(k, v):
        heads, d = attn.num_heads, attn.head_dim
        qh = q.double().view(q.shape[0], -1, heads, d).transpose(1, 2)
        kh = k.double().view(k.shape[0], -1, heads, d).transpose(1, 2)
        vh = v.double().view(v.shape[0], -1, heads, d).transpose(1, 2)
        out = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vh
        return out.transpose(1, 2).reshape(q.shape)

    s = softmax_attention(attn.norm_k(attn.k(txt)), attn.v(txt)) + softmax_attention(
        attn.norm_k_img(attn.k_img(img)), attn.v_img(img))
    emo_k = tokens @ proj["emo_k_proj"].T
    emo_v = tokens @ proj["emo_v_proj"].T
    emo = naive_frame_local_attention(q, emo_k, emo_v, attn.num_heads)
    cross = attn.o(naive_nfeb_mix(s, emo, ip_scale).float())
    h = h + cross
    expected = h + block.ffn(block.norm2(h) * (1 + mod[4]) + mod[3]) * mod[5]

    assert torch.allclose(patched, expected, atol=2e-4, rtol=1e-4)
    plain = block(x, e=e, freqs=freqs, context=context, context_img_len=257)
    assert (patched - plain).abs().max() > 1e-2  # the emotion branch really contributes


@torch.no_grad()
def test_no_emotion_options_runs_the_original_block():
    block, _ = _random_block()
    x, e, freqs, context, _ = _block_inputs(256)
    plain = block(x, e=e, freqs=freqs, context=context, context_img_len=257)
    assert torch.equal(_run_patched(block, x, e, freqs, context, None), plain)


def test_frame_count_mismatch_is_a_clear_error():
    q = torch.randn(1, 10, 8)
    with pytest.raises(ValueError, match="latent frames"):
        frame_local_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), heads=1)


@torch.no_grad()
def test_batched_passes_equal_the_passes_run_alone():
    """ComfyUI batches a window's guided passes (posi at ip_scale, no_emo at 0) into one call: each batch entry
    gets its pass's strength, and the ip_scale-0 entry is the plain Wan block."""
    block, _ = _random_block()
    x, e, freqs, context, tokens = _block_inputs(256, batch=1)
    posi_alone = _run_patched(block, x, e, freqs, context, wan_patch.EmotionPass(tokens, 0.7))
    plain = block(x, e=e, freqs=freqs, context=context, context_img_len=257)
    options = {wan_patch.EMOTION_OPTIONS_KEY: wan_patch.EmotionPass(tokens, (0.7, 0.0)),
               "cond_or_uncond": [1, 0]}  # ComfyUI may put the passes in either order
    out = block(torch.cat([x, x]), e=torch.cat([e, e]), freqs=freqs, context=torch.cat([context, context]),
                context_img_len=257, transformer_options=options)
    assert torch.allclose(out[1:], posi_alone, atol=1e-5, rtol=1e-5)  # entry 1 is pass 0 (posi)
    assert torch.allclose(out[:1], plain, atol=1e-5, rtol=1e-5)  # entry 0 is pass 1 (no_emo, ip_scale 0)


def test_frame_local_attention_through_comfyuis_attention_equals_the_direct_form():
    """The emotion attention runs through ComfyUI's optimized_attention (whatever backend the host chose); on this
    CPU it gives the direct softmax attention's result."""
    from comfy.ldm.modules.attention import optimized_attention

    gen = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 3 * 16, 64, generator=gen), torch.randn(2, 3, 97, 64, generator=gen), \
        torch.randn(2, 3, 97, 64, generator=gen)
    direct = frame_local_attention(q, k, v, heads=4)
    host = frame_local_attention(q, k, v, 4, lambda a, b, c, heads: optimized_attention(a, b, c, heads=heads))
    assert torch.allclose(host, direct, atol=1e-5, rtol=1e-5)
    assert torch.allclose(direct.double(), naive_frame_local_attention(q, k, v, 4), atol=1e-5)
