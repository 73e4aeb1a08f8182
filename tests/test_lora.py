"""The 4-step distillation LoRA through ComfyUI's own LoRA loader onto the FlashPortrait model (in-process).

The tiny LoRA from scripts/make_tiny_models.py has the published key format (lora_down/lora_up, diff,
diff_b, diff_m under ``diffusion_model.``). The published merge is W += strength * up @ down, bias +=
strength * diff_b, modulation += strength * diff_m; the assertions check exactly those values.
"""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flashportrait_core.lora_keys import convert_step_distill_lora, lora_key_summary
from pack import REPO_ROOT, import_pack
from tiny_nodes import tiny_vae  # noqa: F401 (fixture)

pack = import_pack()
import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  ComfyUI's built-in nodes (LoraLoaderModelOnly)

LORA_NAME = "fast_lora_tiny.safetensors"
CONVERTED_NAME = "fast_lora_tiny_comfy.safetensors"


@pytest.fixture(scope="module")
def tiny_setup(tiny_models_dir, tmp_path_factory):
    for folder in ("diffusion_models", "vae", "flashportrait", "flashportrait_conditioning", "loras"):
        folder_paths.add_model_folder_path(folder, str(tiny_models_dir / folder))
    converted_dir = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(converted_dir))
    pack.nodes.register_model_folders()
    model = pack.nodes.loaders.FlashPortraitModelLoader.execute("wan2.1_i2v_tiny.safetensors", "transformer_tiny.pt",
                                                               "default").result[0]
    return model, tiny_models_dir / "loras" / LORA_NAME, converted_dir


def test_comfy_does_not_recognise_published_modulation_diffs(tiny_setup, caplog):
    model, lora_path, _ = tiny_setup
    with caplog.at_level(logging.WARNING):
        (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA_NAME, 1.0)
    skipped = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    published = load_file(str(lora_path))
    assert lora_key_summary(published)["modulation_diffs"] == 3  # two blocks and the head
    assert sorted(skipped) == sorted(f"lora key not loaded: diffusion_model.{name}.diff_m"
                                     for name in ("blocks.0", "blocks.1", "head"))
    assert "diffusion_model.blocks.0.modulation" not in patched.patches
    # The low-rank pairs and bias diffs do load unchanged.
    assert "diffusion_model.blocks.0.self_attn.q.weight" in patched.patches
    assert "diffusion_model.blocks.0.self_attn.q.bias" in patched.patches


def test_converted_lora_applies_the_published_merge_through_lora_loader(tiny_setup, caplog):
    model, lora_path, converted_dir = tiny_setup
    published = load_file(str(lora_path))
    converted = convert_step_distill_lora(published)
    comfy.utils.save_torch_file(converted, str(converted_dir / CONVERTED_NAME))
    strength = 0.75
    with caplog.at_level(logging.WARNING):
        (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, CONVERTED_NAME, strength)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    q, mod = "diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.1.modulation"
    ffn = "diffusion_model.blocks.1.ffn.2"
    keys = [f"{q}.weight", f"{q}.bias", mod, f"{ffn}.weight"]
    before = {k: model.model.state_dict()[k].to(torch.float32) for k in keys}
    after = {k: comfy.lora.calculate_weight(patched.patches[k], before[k].clone(), k) for k in keys}
    up, down = published[f"{q}.lora_up.weight"], published[f"{q}.lora_down.weight"]
    assert torch.allclose(after[f"{q}.weight"], before[f"{q}.weight"] + strength * up @ down, atol=1e-5)
    assert torch.allclose(after[f"{q}.bias"], before[f"{q}.bias"] + strength * published[f"{q}.diff_b"], atol=1e-6)
    assert torch.allclose(after[mod], before[mod] + strength * published["diffusion_model.blocks.1.diff_m"], atol=1e-6)
    up, down = published[f"{ffn}.lora_up.weight"], published[f"{ffn}.lora_down.weight"]
    assert torch.allclose(after[f"{ffn}.weight"], before[f"{ffn}.weight"] + strength * up @ down, atol=1e-5)
    # Every weight the published merge changes is patched (pairs + diffs + diff_b + diff_m), nothing else.
    summary = lora_key_summary(published)
    assert len(patched.patches) == (summary["low_rank_pairs"] + summary["weight_diffs"] + summary["bias_diffs"]
                                    + summary["modulation_diffs"])


def test_patched_model_layer_output_moves_by_the_low_rank_delta(tiny_setup):
    model, lora_path, converted_dir = tiny_setup
    published = load_file(str(lora_path))
    comfy.utils.save_torch_file(convert_step_distill_lora(published), str(converted_dir / CONVERTED_NAME))
    (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, CONVERTED_NAME, 1.0)
    layer_name = "blocks.1.cross_attn.k"
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))

    def layer_output(patcher) -> torch.Tensor:
        layer = patcher.model.diffusion_model.blocks[1].cross_attn.k
        with torch.no_grad():
            return torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float())

    plain = layer_output(model)
    patched.patch_model()
    try:
        with_lora = layer_output(patched)
    finally:
        patched.unpatch_model()
    assert torch.equal(layer_output(model), plain)  # unpatching restored the shared weights
    up = published[f"diffusion_model.{layer_name}.lora_up.weight"]
    down = published[f"diffusion_model.{layer_name}.lora_down.weight"]
    bias_diff = published[f"diffusion_model.{layer_name}.diff_b"]
    expected_delta = x @ (up @ down).T + bias_diff
    assert float((with_lora - plain).abs().max()) > 1e-3
    assert torch.allclose(with_lora - plain, expected_delta, atol=1e-4)


def test_conversion_renames_only_modulation_diffs_and_drops_alpha():
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 4),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(4, 2),
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),
        "blocks.0.diff_m": torch.zeros(1, 6, 4),
        "diffusion_model.blocks.0.norm3.diff": torch.zeros(4),
    }
    converted = convert_step_distill_lora(tensors)
    assert sorted(converted) == sorted([
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
        "diffusion_model.blocks.0.modulation.diff", "diffusion_model.blocks.0.norm3.diff"])
    assert converted["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] is tensors[
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
    with pytest.raises(ValueError, match="no LoRA keys"):
        convert_step_distill_lora({"blocks.0.self_attn.q.weight": torch.ones(2, 2)})


def test_converter_script_writes_a_loadable_file(tiny_setup, tmp_path):
    _, lora_path, _ = tiny_setup
    target = tmp_path / "converted.safetensors"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "convert_fast_lora.py"), str(lora_path),
                             str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = load_file(str(target))
    assert written.keys() == convert_step_distill_lora(load_file(str(lora_path))).keys()
    assert "'modulation_diffs': 3" in result.stdout


# --------------------------------------------------------------------------------------------------
# The sampler node with the LoRA applied: the 4-step path and the sampler choice
# --------------------------------------------------------------------------------------------------

def _run_sampler(model, vae, acceleration="4-step LoRA", steps=30, sampler="euler", target_speedup=0.0):
    from flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning

    positive, negative, clip_output = pack.nodes.conditioning.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    gen = torch.Generator().manual_seed(0)
    emotion = EmotionConditioning(latent_tokens=torch.randn(4, 97, 64, generator=gen), num_video_frames=13,
                                  ip_scale=1.0, emo_cfg=4.0, text_cfg=1.0)
    reference = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(1))
    windows = pack.nodes.windows.WindowSettings(length=4, overlap=2)
    out = pack.nodes.sampler.FlashPortraitSampler.execute(
        model, positive, negative, clip_output, vae, reference, emotion, windows, 7, steps, 5.0, 32,
        acceleration, target_speedup, sampler)
    return out.result[0]["samples"], out.result[1]


def test_sampler_four_step_lora_path_runs_four_steps_with_the_lora(tiny_setup, tiny_vae):
    model, _, converted_dir = tiny_setup
    comfy.utils.save_torch_file(convert_step_distill_lora(load_file(str(tiny_setup[1]))),
                                str(converted_dir / CONVERTED_NAME))
    (with_lora,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, CONVERTED_NAME, 1.0)
    latents, report = _run_sampler(with_lora, tiny_vae)
    # 1 window of 4 latent frames x 4 steps x 2 guided passes (emotion CFG), ALP off.
    assert report.splitlines()[0].startswith("1 window(s) x 4 steps (euler), 8 DiT passes")
    assert "ALP off; steps=30 and schedule" in report and "carries no LoRA" not in report
    plain, plain_report = _run_sampler(model, tiny_vae)
    assert "carries no LoRA" in plain_report
    assert torch.isfinite(latents).all() and not torch.allclose(latents, plain)


def test_sampler_adams2_costs_the_same_passes_and_refuses_alp(tiny_setup, tiny_vae):
    model, _, _ = tiny_setup
    euler, euler_report = _run_sampler(model, tiny_vae, acceleration="off", steps=4)
    adams, adams_report = _run_sampler(model, tiny_vae, acceleration="off", steps=4, sampler="adams2")
    assert euler_report.splitlines()[0].startswith("1 window(s) x 4 steps (euler), 8 DiT passes")
    assert adams_report.splitlines()[0].startswith("1 window(s) x 4 steps (adams2), 8 DiT passes")
    assert not torch.allclose(euler, adams)
    with pytest.raises(ValueError, match="do not combine"):
        _run_sampler(model, tiny_vae, acceleration="quality", steps=4, sampler="adams2")
