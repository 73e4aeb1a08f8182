"""The guider in-process on the tiny checkpoints: conditioning entries, schedule steps, ComfyUI samplers that
evaluate between the schedule's levels, and what it refuses."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model, tiny_vae  # noqa: F401 (fixtures)

pack = import_pack()
import comfy.samplers  # noqa: E402
from comfy_extras import nodes_easycache  # noqa: E402

guider_module = pack.nodes.guider
guider_nodes = pack.nodes.guider_nodes


def _inputs():
    positive, negative, clip_output = pack.nodes.conditioning.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    emotion = EmotionConditioning(latent_tokens=torch.randn(3, 97, 64, generator=torch.Generator().manual_seed(0)),
                                  num_video_frames=9, ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0)
    reference = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(1))
    return positive, negative, clip_output, emotion, reference


def _sample(model, vae, sampler_name: str, positive=None, steps: int = 3, acceleration: str = "off"):
    base_positive, negative, clip_output, emotion, reference = _inputs()
    guider, latent = guider_nodes.FlashPortraitGuiderNode.execute(
        model, positive or base_positive, negative, clip_output, vae, reference, emotion,
        pack.nodes.windows.WindowSettings(2, 1), 32, acceleration).result
    sigmas = guider_nodes.FlashPortraitSchedule.execute("published", steps, 5.0).result[0]
    noise = comfy.sample.prepare_noise(latent["samples"], 3)
    samples = guider.sample(noise, latent["samples"], comfy.samplers.sampler_object(sampler_name), sigmas, seed=3)
    return samples, guider.report


def test_schedule_step_finds_levels_and_the_interval_of_intermediate_evaluations():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    assert [guider_module.schedule_step(sigmas, torch.tensor([s])) for s in (1.0, 0.8, 0.5)] == [0, 1, 2]
    assert guider_module.schedule_step(sigmas, torch.tensor([0.9])) == 0  # Heun's second evaluation of step 0
    assert guider_module.schedule_step(sigmas, torch.tensor([0.2])) == 2
    with pytest.raises(ValueError, match="above the schedule"):
        guider_module.schedule_step(sigmas, torch.tensor([1.5]))


def test_conditioning_entries_are_kept_and_prepared_for_the_windows():
    clip = object()
    entries, notes = guider_module.window_conditioning(
        [[torch.zeros(1, 4, 8), {"concat_latent_image": torch.zeros(1), "start_percent": 0.2}],
         [torch.ones(1, 4, 8), {"strength": 0.5}]], clip)
    assert len(entries) == 2 and entries[1][1] == {"strength": 0.5, "clip_vision_output": clip}
    assert "concat_latent_image" not in entries[0][1] and entries[0][1]["start_percent"] == 0.2
    assert notes == ["conditioning entry 0: concat_latent_image from upstream replaced by the windows' own reference "
                     "condition"]
    with pytest.raises(ValueError, match="area or mask"):
        guider_module.window_conditioning([[torch.zeros(1, 4, 8), {"area": (8, 8, 0, 0)}]], clip)


def test_heun_evaluates_between_levels_and_is_counted(tiny_model, tiny_vae):
    samples, report = _sample(tiny_model, tiny_vae, "heun")
    assert torch.isfinite(samples).all()
    # Heun: two evaluations per step but the last (which is Euler); 2 windows x 2 guided passes each.
    assert sum(report.model_passes) == (2 * 3 - 1) * 2 * 2
    assert report.sampler == "heun"


def test_combined_and_timestep_ranged_conditioning_change_the_result(tiny_model, tiny_vae):
    positive, _, _, _, _ = _inputs()
    plain, _ = _sample(tiny_model, tiny_vae, "euler")
    other_prompt = positive[0][0].flip(1)
    combined, _ = _sample(tiny_model, tiny_vae, "euler", positive + [[other_prompt, dict(positive[0][1])]])
    ranged, _ = _sample(tiny_model, tiny_vae, "euler",
                        [positive[0], [other_prompt, dict(positive[0][1], start_percent=0.5, end_percent=1.0)]])
    assert not torch.allclose(plain, combined) and not torch.allclose(plain, ranged)
    assert not torch.allclose(combined, ranged)


def test_easycache_on_the_model_is_refused_with_the_reason(tiny_model, tiny_vae):
    cached = nodes_easycache.EasyCacheNode.execute(tiny_model, 0.2, 0.15, 0.95, False).result[0]
    with pytest.raises(ValueError, match="another window's residual.*acceleration setting"):
        _sample(cached, tiny_vae, "euler")


def test_alp_with_another_sampler_is_refused(tiny_model, tiny_vae):
    with pytest.raises(ValueError, match="only with the euler sampler"):
        _sample(tiny_model, tiny_vae, "dpmpp_2m", acceleration="quality")


def test_a_latent_of_another_length_is_refused(tiny_model, tiny_vae):
    positive, negative, clip_output, emotion, reference = _inputs()
    guider, _ = guider_nodes.FlashPortraitGuiderNode.execute(
        tiny_model, positive, negative, clip_output, tiny_vae, reference, emotion,
        pack.nodes.windows.WindowSettings(2, 1), 32).result
    latent = torch.zeros(1, 16, 5, 4, 4)
    with pytest.raises(ValueError, match="5 latent frames but the emotion conditioning drives 3"):
        guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object("euler"),
                      torch.tensor([1.0, 0.0]), seed=0)


def test_the_emotion_attention_survives_torch_compile(tiny_model, tiny_vae):
    """ComfyUI's TorchCompileModel wraps the diffusion model in torch.compile. Dynamo's eager backend traces the
    model exactly as inductor does, without building kernels: the emotion branch must still be in the result.
    (TorchCompileModel with inductor itself gave the same latents within 7e-7 here, but compiles for minutes on
    this CPU.)"""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    import torch._dynamo

    plain, _ = _sample(tiny_model, tiny_vae, "euler", steps=2)
    compiled_model = tiny_model.clone()
    set_torch_compile_wrapper(model=compiled_model, backend="eager")
    try:
        compiled, _ = _sample(compiled_model, tiny_vae, "euler", steps=2)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(compiled, plain, rtol=1e-4, atol=1e-4)
