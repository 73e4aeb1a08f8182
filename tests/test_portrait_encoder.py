"""Portrait encoder: key names, configuration read from weights, numerics, batching."""
from __future__ import annotations

import math

import pytest
import torch

from flashportrait_core.conditioning.emotion_tokens import emotion_tokens_per_latent_frame
from flashportrait_core.conditioning.portrait_encoder import (
    PUBLISHED_PORTRAIT_ENCODER_CONFIG,
    PerceiverAttention,
    PortraitEncoder,
    count_parameters,
    encode_expression_features,
    heads_from_inner_dim,
    load_portrait_encoder,
    portrait_encoder_config_from_state_dict,
    random_portrait_encoder_state_dict,
    split_portrait_encoder_keys,
)


@pytest.fixture(scope="module")
def state_dict():
    return random_portrait_encoder_state_dict(seed=3)


@pytest.fixture(scope="module")
def encoder(state_dict):
    return load_portrait_encoder(state_dict)


def test_published_key_names(state_dict):
    expected_proj = {f"proj_model.{p}_proj.weight" for p in ("headpose", "eye", "emo", "mouth")}
    expected_proj |= {"proj_model.norm.weight", "proj_model.norm.bias"}
    assert {k for k in state_dict if k.startswith("proj_model.")} == expected_proj
    for prefix in ("mouth_proj_model.", "emo_proj_model."):
        keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        expected = {"latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
                    "norm_out.weight", "norm_out.bias"}
        for i in range(2):
            expected |= {f"layers.{i}.0.{name}" for name in (
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                "to_q.weight", "to_kv.weight", "to_out.weight")}
            expected |= {f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias",
                         f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight"}
        assert keys == expected
    assert state_dict["mouth_proj_model.latents"].shape == (1, 16, 64)
    assert state_dict["emo_proj_model.latents"].shape == (1, 4, 64)
    assert state_dict["mouth_proj_model.proj_in.weight"].shape == (64, 512)
    assert state_dict["emo_proj_model.proj_in.weight"].shape == (64, 30)
    assert state_dict["mouth_proj_model.layers.0.0.to_kv.weight"].shape == (256, 64)
    assert state_dict["mouth_proj_model.layers.0.1.1.weight"].shape == (256, 64)


@pytest.mark.parametrize("kwargs", [
    {},
    {"output_dim": 32, "resampler_dim": 48, "depth": 1, "heads": 1, "dim_head": 16, "ff_mult": 2},
    {"output_dim": 16, "resampler_dim": 32, "depth": 3, "heads": 3, "dim_head": 64},
])
def test_config_read_back_equals_config_used(kwargs):
    sd = random_portrait_encoder_state_dict(seed=0, **kwargs)
    config = portrait_encoder_config_from_state_dict(sd)
    defaults = {"output_dim": 64, "resampler_dim": 64, "depth": 2, "heads": 2, "dim_head": 64, "ff_mult": 4}
    made = {**defaults, **kwargs}
    assert config.output_dim == made["output_dim"]
    assert config.feature_split == (6, 6, 30, 512) and config.feature_dim == 554
    assert config.tokens_per_frame == 24
    for resampler, queries, embedding in ((config.mouth, 16, 512), (config.emo, 4, 30)):
        assert (resampler.dim, resampler.depth, resampler.heads, resampler.dim_head, resampler.ff_mult) == (
            made["resampler_dim"], made["depth"], made["heads"], made["dim_head"], made["ff_mult"])
        assert (resampler.num_queries, resampler.embedding_dim, resampler.output_dim) == (
            queries, embedding, made["output_dim"])


def test_published_size_counted_without_allocating():
    config = PUBLISHED_PORTRAIT_ENCODER_CONFIG
    assert config.mouth.heads == 20 and config.mouth.inner_dim == 1280
    # proj_model 2048*554 + LayerNorm; each resampler: latents, proj_in, 4 x (attention + ff), proj_out, norm_out.
    layer = 2 * 2 * 1280 + 4 * 1280 * 1280 + 2 * 1280 + 2 * 1280 * 5120
    tail = 4 * layer + 1280 * 2048 + 2048 + 2 * 2048
    mouth = 16 * 1280 + 512 * 1280 + 1280 + tail
    emo = 4 * 1280 + 30 * 1280 + 1280 + tail
    expected = 2048 * 554 + 2 * 2048 + mouth + emo
    assert count_parameters(config) == expected == 164_463_616


def test_heads_rule():
    assert heads_from_inner_dim(1280) == (20, 64)
    assert heads_from_inner_dim(32) == (1, 32)
    with pytest.raises(ValueError, match="multiple"):
        heads_from_inner_dim(96)


def test_loader_accepts_nesting_and_rejects_wrong_files(state_dict):
    nested = load_portrait_encoder({"state_dict": dict(state_dict)})
    assert isinstance(nested, PortraitEncoder) and not nested.training
    missing = dict(state_dict)
    del missing["mouth_proj_model.layers.1.0.to_out.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.0\.to_out\.weight.*portrait_encoder\.pt|portrait_encoder\.pt.*layers\.1\.0\.to_out"):
        load_portrait_encoder(missing)
    extra = dict(state_dict)
    extra["proj_model.mouth_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"unexpected keys \['proj_model\.mouth_proj\.bias'\]"):
        load_portrait_encoder(extra)
    with pytest.raises(ValueError, match="portrait_encoder.pt"):
        load_portrait_encoder({"blocks.0.cross_attn.emo_k_proj.weight": torch.zeros(4, 4)})


def test_loader_keeps_the_given_tensors(state_dict, encoder):
    assert encoder.proj_model.mouth_proj.weight.data_ptr() == state_dict["proj_model.mouth_proj.weight"].data_ptr()
    assert encoder.mouth_proj_model.layers[0][0].heads == 2


def reference_attention(attention: PerceiverAttention, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v over [x, latents], written with einsum in float64."""
    def layer_norm(t, norm):
        t = t.double()
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()

    heads, dim_head = attention.heads, attention.dim_head
    xn, ln = layer_norm(x, attention.norm1), layer_norm(latents, attention.norm2)
    context = torch.cat([xn, ln], dim=1)
    q = torch.einsum("bld,ed->ble", ln, attention.to_q.weight.double())
    kv = torch.einsum("bnd,ed->bne", context, attention.to_kv.weight.double())
    k, v = kv[..., :heads * dim_head], kv[..., heads * dim_head:]
    q = q.unflatten(-1, (heads, dim_head))
    k = k.unflatten(-1, (heads, dim_head))
    v = v.unflatten(-1, (heads, dim_head))
    logits = torch.einsum("blhd,bnhd->bhln", q, k) / math.sqrt(dim_head)
    out = torch.einsum("bhln,bnhd->blhd", logits.softmax(-1), v).flatten(-2)
    return torch.einsum("ble,de->bld", out, attention.to_out.weight.double())


def test_perceiver_attention_matches_einsum_reference(encoder):
    torch.manual_seed(0)
    attention = encoder.mouth_proj_model.layers[1][0]
    x = torch.randn(5, 3, 64)
    latents = torch.randn(5, 16, 64)
    with torch.no_grad():
        out = attention(x, latents)
        expected = reference_attention(attention, x, latents)
    assert out.shape == (5, 16, 64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_projection_tokens_are_per_part_layer_norms(encoder):
    torch.manual_seed(1)
    features = torch.randn(3, 554)
    with torch.no_grad():
        tokens = encoder(features)
    proj = encoder.proj_model
    parts = torch.split(features, [6, 6, 30, 512], dim=-1)
    layers = (proj.headpose_proj, proj.eye_proj, proj.emo_proj, proj.mouth_proj)
    for i, (layer, part) in enumerate(zip(layers, parts)):
        expected = torch.nn.functional.layer_norm(
            part @ layer.weight.T, (64,), proj.norm.weight, proj.norm.bias)
        torch.testing.assert_close(tokens[:, i], expected)
    # The mouth and emotion tokens depend only on their own parts.
    altered = features.clone()
    altered[:, :12] += 1.0  # headpose and eye only
    with torch.no_grad():
        tokens_altered = encoder(altered)
    torch.testing.assert_close(tokens_altered[:, 4:], tokens[:, 4:], rtol=0, atol=0)
    assert not torch.allclose(tokens_altered[:, :2], tokens[:, :2])


def test_encode_is_deterministic_and_batch_independent(encoder):
    torch.manual_seed(2)
    features = torch.randn(37, 554)
    whole = encode_expression_features(encoder, features)
    chunked = encode_expression_features(encoder, features, batch_size=5)
    assert whole.shape == (37, 24, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)  # BLAS blocking varies with batch
    torch.testing.assert_close(encode_expression_features(encoder, features), whole, rtol=0, atol=0)
    again = load_portrait_encoder(random_portrait_encoder_state_dict(seed=3))
    torch.testing.assert_close(encode_expression_features(again, features), whole, rtol=0, atol=0)
    whole.mul_(2.0)  # an ordinary tensor, usable in place outside inference mode


def test_encode_validates_input(encoder):
    with pytest.raises(ValueError, match="554"):
        encode_expression_features(encoder, torch.zeros(4, 553))
    bad = torch.zeros(4, 554)
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"frames \[2\]"):
        encode_expression_features(encoder, bad)


def test_tokens_to_latent_windows_zero_padding_is_exact(encoder):
    features = torch.randn(9, 554, generator=torch.Generator().manual_seed(4))
    windows = emotion_tokens_per_latent_frame(encode_expression_features(encoder, features))
    assert windows.shape == (3, 97, 64)
    assert torch.count_nonzero(windows[0, 24:]) == 0
    assert torch.all(windows[0, :24].abs().sum(-1) > 0)
    # Bias-free emotion key/value projections map the padding to exact zeros.
    projection = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        assert torch.count_nonzero(projection(windows[0, 24:])) == 0


def test_different_seeds_give_different_weights():
    a = random_portrait_encoder_state_dict(seed=0)
    b = random_portrait_encoder_state_dict(seed=1)
    assert not torch.equal(a["mouth_proj_model.latents"], b["mouth_proj_model.latents"])
    with pytest.raises(ValueError, match="dim_head"):
        random_portrait_encoder_state_dict(heads=2, dim_head=32)


def test_loader_ignores_keys_outside_the_encoder_as_published(state_dict):
    # The published infer.py keeps only the three encoder prefixes of portrait_encoder.pt (e.g. a file saved with
    # training state beside the weights); such a file loads, and the other keys are named.
    extended = {**state_dict, "optimizer.step": torch.tensor(1200), "ip_adapter.blocks.0.k.weight": torch.zeros(2, 2)}
    kept, ignored = split_portrait_encoder_keys({"state_dict": extended})
    assert kept.keys() == state_dict.keys()
    assert ignored == ["ip_adapter.blocks.0.k.weight", "optimizer.step"]
    encoder = load_portrait_encoder(extended)
    features = torch.randn(3, 554, generator=torch.Generator().manual_seed(0))
    reference = load_portrait_encoder(state_dict)
    assert torch.equal(encoder.float()(features), reference.float()(features))
    # Needed keys still count: a missing one, or an unknown one under an encoder prefix, is refused.
    missing = {k: v for k, v in extended.items() if k != "emo_proj_model.norm_out.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['emo_proj_model\.norm_out\.weight'\]"):
        load_portrait_encoder(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['mouth_proj_model\.extra\.weight'\]"):
        load_portrait_encoder({**extended, "mouth_proj_model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no key of FlashPortrait's portrait_encoder\.pt.*\['ip_adapter', 'optimizer'\]"):
        load_portrait_encoder({"optimizer.step": torch.tensor(1), "ip_adapter.w": torch.zeros(1)})
