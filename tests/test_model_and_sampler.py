"""The loader and sampler nodes in-process, on the tiny format-faithful checkpoints."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.checkpoints import load_state_dict
from flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model, tiny_vae  # noqa: F401 (fixtures)

pack = import_pack()
# The nodes raise the pack's own classes (the core imported as part of the pack).
from flashportrait_pack.flashportrait_core.checkpoints import CheckpointError  # noqa: E402

loaders = pack.nodes.loaders
conditioning_nodes = pack.nodes.conditioning
wan_runner = pack.nodes.wan_runner
windows_node = pack.nodes.windows




def test_loader_overlays_flashportrait_weights_and_attaches_emotion_projections(tiny_model, tiny_folders):
    overlay = load_state_dict(tiny_folders / "flashportrait" / "transformer_tiny.pt")
    base = load_state_dict(tiny_folders / "diffusion_models" / "wan2.1_i2v_tiny.safetensors")
    dit = tiny_model.model.diffusion_model
    assert type(tiny_model.model).__name__ == "WAN21"
    stored = dit.blocks[1].self_attn.q.weight.dtype  # ComfyUI picks the storage dtype (fp16/bf16 on a GPU)

    def same(weight, expected):
        return torch.equal(weight.cpu(), expected.to(stored))

    # Attention comes from the FlashPortrait file, the FFN from the Wan base model.
    assert same(dit.blocks[1].self_attn.q.weight, overlay["blocks.1.self_attn.q.weight"])
    assert not same(dit.blocks[1].self_attn.q.weight, base["blocks.1.self_attn.q.weight"])
    assert same(dit.blocks[0].ffn[0].weight, base["blocks.0.ffn.0.weight"])
    assert same(dit.blocks[1].cross_attn.emo_v_proj.weight, overlay["blocks.1.cross_attn.emo_v_proj.weight"])
    assert dit.blocks[1].cross_attn.emo_v_proj.weight.dtype == stored
    assert "diffusion_model.blocks.0.cross_attn.emo_k_proj.weight" in tiny_model.model.state_dict()
    replaced = tiny_model.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(replaced) == {("double_block", 0), ("double_block", 1)}


def test_safetensors_overlay_loads_the_same_model(tiny_model, tiny_folders):
    other = loaders.FlashPortraitModelLoader.execute("wan2.1_i2v_tiny.safetensors",
                                                     "transformer_tiny.safetensors", "default").result[0]
    mine, theirs = tiny_model.model.state_dict(), other.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_loader_names_the_expected_file_when_slots_are_swapped(tiny_folders):
    with pytest.raises(CheckpointError, match="portrait_encoder_tiny.safetensors .*transformer.pt"):
        loaders.FlashPortraitModelLoader.execute("wan2.1_i2v_tiny.safetensors", "portrait_encoder_tiny.safetensors",
                                                 "default")
    with pytest.raises(FileNotFoundError, match="flashportrait"):
        loaders.FlashPortraitModelLoader.execute("wan2.1_i2v_tiny.safetensors", "missing.pt", "default")


def _emotion(num_latent, ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return EmotionConditioning(latent_tokens=torch.randn(num_latent, 97, 64, generator=gen),
                               num_video_frames=4 * (num_latent - 1) + 1, ip_scale=ip_scale, emo_cfg=emo_cfg,
                               text_cfg=text_cfg)


def _sample(model, vae, emotion, seed=7, steps=3, length=4, overlap=2, acceleration="off"):
    positive, negative, clip_output = conditioning_nodes.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    reference = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(1))
    windows = windows_node.WindowSettings(length, overlap)
    latents, report, _ = pack.nodes.sampler.FlashPortraitSampler.sample(
        model, positive, negative, clip_output, vae, reference, emotion, windows, seed, steps, 5.0, 32, acceleration)
    return latents, report


class CountingModel:
    """Counts the DiT passes the Wan model really ran (batch entries of apply_model: ComfyUI batches the guided
    passes of a window into one call when memory allows), independently of the sampler's bookkeeping."""

    def __init__(self, model_patcher):
        self.calls = 0
        self.inner = model_patcher.model
        self.original = self.inner.apply_model

    def __enter__(self):
        def counted(x, *args, **kwargs):
            self.calls += x.shape[0]
            return self.original(x, *args, **kwargs)

        self.inner.apply_model = counted
        return self

    def __exit__(self, *exc):
        del self.inner.apply_model


def test_sampler_runs_windows_and_reports_true_pass_counts(tiny_model, tiny_vae):
    emotion = _emotion(num_latent=7)
    with CountingModel(tiny_model) as counter:
        latents, report = _sample(tiny_model, tiny_vae, emotion)
    assert latents.shape == (1, 16, 7, 4, 4)  # 40x30 scaled to 32x24, width rounded up to 32
    assert torch.isfinite(latents).all()
    assert report.windows == [(0, 4), (2, 6), (3, 7)]
    assert sum(report.model_passes) == counter.calls == 3 * 3 * 2  # windows x steps x (posi, no_emo)
    assert "3 window(s)" in report.text() and "ALP" not in report.text()


def test_sampler_is_deterministic_and_responds_to_expressions(tiny_model, tiny_vae):
    first, _ = _sample(tiny_model, tiny_vae, _emotion(5))
    again, _ = _sample(tiny_model, tiny_vae, _emotion(5))
    other_face, _ = _sample(tiny_model, tiny_vae, _emotion(5, seed=1))
    no_emotion, _ = _sample(tiny_model, tiny_vae, _emotion(5, ip_scale=0.0, emo_cfg=1.0))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_face)
    assert not torch.allclose(first, no_emotion)


def test_text_guidance_adds_the_negative_pass(tiny_model, tiny_vae):
    with CountingModel(tiny_model) as counter:
        _, report = _sample(tiny_model, tiny_vae, _emotion(3, text_cfg=2.0), steps=2)
    assert counter.calls == sum(report.model_passes) == 2 * 3


def test_generation_size_follows_the_published_rounding():
    assert wan_runner.generation_size(512, 512, 720) == (720, 720)
    assert wan_runner.generation_size(1080, 720, 720) == (720, 480)
    assert wan_runner.generation_size(1000, 333, 720) == (720, 240)  # 239.76 -> 239 -> rounded up to 240


def test_window_node_refuses_overlap_not_below_length():
    assert windows_node.FlashPortraitWindows.validate_inputs(5, 5) != True  # noqa: E712
    assert windows_node.FlashPortraitWindows.validate_inputs(5, 4) is True


def test_alp_skips_passes_and_reports_the_true_count(tiny_model, tiny_vae):
    steps = 12
    with CountingModel(tiny_model) as counter:
        fast, report = _sample(tiny_model, tiny_vae, _emotion(7), steps=steps, acceleration="fast")
    assert counter.calls == sum(report.model_passes)
    full_passes = 3 * steps * 2  # windows x steps x guided passes
    assert counter.calls < full_passes / 2
    for state, passes in zip(report.alp_states, report.model_passes):
        counts = state.report()
        assert counts["computed"] + counts["skipped"] == steps
        assert passes == 2 * counts["computed"]  # each computed step runs both guided passes
        assert counts["computed_steps"][0] == 0 and counts["computed_steps"][-1] == steps - 1
    assert "skipped" in report.text() and torch.isfinite(fast).all()
    again, _ = _sample(tiny_model, tiny_vae, _emotion(7), steps=steps, acceleration="fast")
    assert torch.equal(fast, again)
    # The layer-aware dial saw block outputs from the patched blocks at computed steps.
    assert any(state.layer_ratios for state in report.alp_states)


def _conditioning_with_encoder():
    portrait_core = pack.flashportrait_core.conditioning.portrait_encoder
    encoder = portrait_core.load_portrait_encoder(portrait_core.random_portrait_encoder_state_dict(seed=3)).float()
    features = torch.randn(5, encoder.config.feature_dim, generator=torch.Generator().manual_seed(4))
    return pack.flashportrait_core.conditioning.emotion_conditioning.build_emotion_conditioning(encoder, features)


def test_portrait_encoder_is_left_alone_when_sampling_on_its_device():
    emotion = _conditioning_with_encoder()
    weight = next(emotion.encoder.parameters())
    with wan_runner.portrait_encoder_on("cpu", emotion):
        assert next(emotion.encoder.parameters()) is weight


def test_portrait_encoder_visits_the_sampling_device_and_comes_back(monkeypatch):
    # No GPU here: record the moves instead of making them.
    emotion = _conditioning_with_encoder()
    moves, freed = [], []
    monkeypatch.setattr(emotion.encoder, "to", lambda device: moves.append(torch.device(device)))
    monkeypatch.setattr(wan_runner.comfy.model_management, "free_memory", lambda size, device: freed.append(size))
    with wan_runner.portrait_encoder_on("cuda:0", emotion):
        assert moves == [torch.device("cuda:0")]
    assert moves == [torch.device("cuda:0"), torch.device("cpu")]
    assert freed == [sum(t.numel() * 4 for t in emotion.encoder.state_dict().values())]


def test_portrait_encoder_stays_home_when_the_device_is_full(monkeypatch):
    emotion = _conditioning_with_encoder()
    moves = []

    def move(device):
        moves.append(torch.device(device))
        if torch.device(device).type == "cuda":
            raise wan_runner.comfy.model_management.OOM_EXCEPTION("out of memory")

    monkeypatch.setattr(emotion.encoder, "to", move)
    monkeypatch.setattr(wan_runner.comfy.model_management, "free_memory", lambda size, device: None)
    with wan_runner.portrait_encoder_on("cuda:0", emotion):
        assert moves == [torch.device("cuda:0"), torch.device("cpu")]  # tokens are encoded on the CPU
