"""The sampler interrupted through ComfyUI's own interrupt, then re-run: it resumes to the identical latents."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.conditioning.emotion_conditioning import EmotionConditioning
from flashportrait_core.sampling.windows import plan_windows
from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model, tiny_vae  # noqa: F401 (fixtures)

pack = import_pack()
import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402

conditioning_nodes = pack.nodes.conditioning
wan_runner = pack.nodes.wan_runner
alp_core = pack.flashportrait_core.sampling.alp

STEPS = 4


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, tiny_vae):
    return tiny_model, tiny_vae


@pytest.fixture
def output_dir(tmp_path):
    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(previous)


def _sample(model, vae, alp, seed=7, solver="euler"):
    positive, negative, clip_output = conditioning_nodes.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    tokens = torch.randn(7, 97, 64, generator=torch.Generator().manual_seed(0))
    emotion = EmotionConditioning(latent_tokens=tokens, num_video_frames=25, ip_scale=1.0, emo_cfg=4.0,
                                  text_cfg=1.0)
    reference = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(1))
    height, width = wan_runner.generation_size(40, 30, 32)
    return wan_runner.run_flashportrait_sampling(model, vae, positive[0][0], negative[0][0], clip_output,
                                                 reference, emotion, plan_windows(7, 4, 2), seed, STEPS, 5.0,
                                                 height, width, alp, solver=solver)


class InterruptAfter:
    """Presses ComfyUI's interrupt once the model has run ``calls`` times; the sampler stops at its next check."""

    def __init__(self, model_patcher, calls: int):
        self.inner, self.limit, self.calls = model_patcher.model, calls, 0
        self.original = self.inner.apply_model

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls == self.limit:
                comfy.model_management.interrupt_current_processing(True)
            return self.original(*args, **kwargs)

        self.inner.apply_model = counted
        return self

    def __exit__(self, *exc):
        del self.inner.apply_model
        comfy.model_management.interrupt_current_processing(False)


def test_interrupted_sampler_resumes_to_the_same_latents(tiny_setup, output_dir):
    """ALP on (the harder case: its per-window histories must come back too); the core tests cover ALP off."""
    model, vae = tiny_setup
    alp = alp_core.preset("quality")
    uninterrupted, full_report = _sample(model, vae, alp)
    assert full_report.resumed_from_step == 0
    assert not any(output_dir.rglob("*.pt"))  # a finished run leaves no checkpoint
    # 4 steps, quality: steps 0 and 3 computed, 1 and 2 forecast; 3 windows x 2 guided passes per computed step.
    assert sum(full_report.model_passes) == 12

    # Interrupt during the last step: steps 0-2 are complete and checkpointed.
    with InterruptAfter(model, calls=8), pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(model, vae, alp)
    checkpoints = list((output_dir / wan_runner.RESUME_SUBFOLDER).glob("*.pt"))
    assert len(checkpoints) == 1
    assert torch.load(checkpoints[0], weights_only=True)["completed_steps"] == 3

    resumed, report = _sample(model, vae, alp)
    assert report.resumed_from_step == 3
    assert f"resumed from step 3 of {STEPS}" in report.text()
    assert torch.equal(resumed, uninterrupted)
    assert report.model_passes == full_report.model_passes  # counts carried over in the checkpoint
    assert [s.computed_steps for s in report.alp_states] == [s.computed_steps for s in full_report.alp_states]
    assert not (output_dir / wan_runner.RESUME_SUBFOLDER).exists()


def test_interrupted_adams_sampler_resumes_to_the_same_latents(tiny_setup, output_dir):
    model, vae = tiny_setup
    uninterrupted, _ = _sample(model, vae, None, solver="adams2")
    # 3 windows x 2 guided passes a step: the interrupt in step 2 leaves steps 0-1 checkpointed with their
    # velocity history.
    with InterruptAfter(model, calls=14), pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(model, vae, None, solver="adams2")
    resumed, report = _sample(model, vae, None, solver="adams2")
    assert report.resumed_from_step == 2
    assert torch.equal(resumed, uninterrupted)


def test_latents_stay_on_the_model_device_for_one_window_or_a_cpu_model():
    assert wan_runner.latent_storage_device("cpu", plan_windows(20, 4, 2)) == torch.device("cpu")
    assert wan_runner.latent_storage_device("cuda:0", plan_windows(3, 4, 2)) == torch.device("cuda:0")
    assert wan_runner.latent_storage_device("cuda:0", plan_windows(20, 4, 2)) == torch.device("cpu")
