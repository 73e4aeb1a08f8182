"""The sampler interrupted through ComfyUI's own interrupt, then re-run: it resumes to the identical latents, writing
checkpoints only as often as the ``resume`` setting asks."""
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
resume_store = pack.nodes.resume_store
wan_runner = pack.nodes.wan_runner

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


def _sample(model, vae, acceleration="quality", resume="every step", seed=7, sampler="euler", reference_seed=1):
    positive, negative, clip_output = conditioning_nodes.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    tokens = torch.randn(7, 97, 64, generator=torch.Generator().manual_seed(0))
    emotion = EmotionConditioning(latent_tokens=tokens, num_video_frames=25, ip_scale=1.0, emo_cfg=4.0,
                                  text_cfg=1.0)
    reference = torch.rand(1, 40, 30, 3, generator=torch.Generator().manual_seed(reference_seed))
    windows = pack.nodes.windows.WindowSettings(4, 2)  # 3 windows over 7 latent frames
    latents, report, text = pack.nodes.sampler.FlashPortraitSampler.sample(
        model, positive, negative, clip_output, vae, reference, emotion, windows, seed, STEPS, 5.0, 32,
        acceleration, sampler=sampler, resume=resume)
    return latents, report, text


def _checkpoints(output_dir):
    return sorted((output_dir / resume_store.RESUME_SUBFOLDER).glob("*.pt"))


class InterruptAfter:
    """Presses ComfyUI's interrupt once the model has run ``passes`` DiT passes (batch entries); the sampler stops
    at its next check, before the next window."""

    def __init__(self, model_patcher, passes: int):
        self.inner, self.limit, self.passes = model_patcher.model, passes, 0
        self.original = self.inner.apply_model

    def __enter__(self):
        def counted(x, *args, **kwargs):
            out = self.original(x, *args, **kwargs)
            self.passes += x.shape[0]
            if self.passes >= self.limit:
                comfy.model_management.interrupt_current_processing(True)
            return out

        self.inner.apply_model = counted
        return self

    def __exit__(self, *exc):
        del self.inner.apply_model
        comfy.model_management.interrupt_current_processing(False)


def _interrupted(model, vae, passes, **settings):
    with InterruptAfter(model, passes), pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(model, vae, **settings)


def test_interrupted_sampler_resumes_to_the_same_latents(tiny_setup, output_dir):
    """ALP on (the harder case: its per-window histories must come back too)."""
    model, vae = tiny_setup
    uninterrupted, full_report, text = _sample(model, vae)
    assert full_report.resumed_from == "" and not _checkpoints(output_dir)  # a finished run leaves none
    # 4 steps, quality: steps 0 and 3 computed, 1 and 2 forecast; 3 windows x 2 guided passes per computed step.
    assert sum(full_report.model_passes) == 12

    _interrupted(model, vae, passes=8)  # during step 3: the checkpoint at its start holds steps 0-2
    (checkpoint,) = _checkpoints(output_dir)
    assert torch.load(checkpoint, weights_only=True)["completed_steps"] == 3

    resumed, report, text = _sample(model, vae)
    assert report.resumed_from == "step 3" and "resumed from step 3" in text
    assert torch.equal(resumed, uninterrupted)
    assert report.model_passes == full_report.model_passes  # counts carried over in the checkpoint
    assert [s.computed_steps for s in report.alp_states] == [s.computed_steps for s in full_report.alp_states]
    assert not _checkpoints(output_dir)


def test_per_window_checkpoints_resume_inside_a_step(tiny_setup, output_dir):
    model, vae = tiny_setup
    uninterrupted, _, _ = _sample(model, vae, acceleration="off", resume="off")
    _interrupted(model, vae, passes=13, acceleration="off", resume="every window")  # step 2, window 0 done
    resumed, report, text = _sample(model, vae, acceleration="off", resume="every window")
    assert report.resumed_from == "step 2, window 1"
    assert torch.equal(resumed, uninterrupted)
    assert sum(report.model_passes) == 3 * STEPS * 2
    assert "resume: a checkpoint after every window" in text
    assert not _checkpoints(output_dir)


def test_resume_off_writes_nothing_and_every_n_steps_writes_every_n(tiny_setup, output_dir):
    model, vae = tiny_setup
    _interrupted(model, vae, passes=20, acceleration="off", resume="off")  # step 3
    assert not (output_dir / resume_store.RESUME_SUBFOLDER).exists()

    written = []
    real_save = resume_store.save_checkpoint
    resume_store.save_checkpoint = lambda path, key, checkpoint: (written.append(checkpoint.completed_steps),
                                                                  real_save(path, key, checkpoint))
    try:
        _, _, text = _sample(model, vae, acceleration="off", resume="every 2 steps")
    finally:
        resume_store.save_checkpoint = real_save
    assert written == [2]  # step starts 2 (and 4 would be the end): one checkpoint
    assert "resume: a checkpoint every 2 steps" in text and " MB each" in text
    assert not _checkpoints(output_dir)


def test_a_new_run_of_the_job_with_other_settings_removes_its_old_checkpoints_only(tiny_setup, output_dir):
    model, vae = tiny_setup
    _interrupted(model, vae, passes=8)
    _interrupted(model, vae, passes=8, reference_seed=2)  # another job: another reference image
    assert len(_checkpoints(output_dir)) == 2
    _, _, text = _sample(model, vae, seed=8)  # the first job, another seed
    assert "removed 1 checkpoint(s) of this job made with other settings" in text
    (left,) = _checkpoints(output_dir)
    _, report, _ = _sample(model, vae, reference_seed=2)  # the other job's checkpoint still resumes
    assert report.resumed_from == "step 3"
    assert not _checkpoints(output_dir)


def test_a_multistep_sampler_writes_no_checkpoints_and_says_why(tiny_setup, output_dir):
    model, vae = tiny_setup
    _interrupted(model, vae, passes=14, acceleration="off", sampler="adams2")
    assert not (output_dir / resume_store.RESUME_SUBFOLDER).exists()
    _, _, text = _sample(model, vae, acceleration="off", sampler="adams2")
    assert "only the euler sampler can be resumed exactly" in text


def test_latents_stay_on_the_model_device_for_one_window_or_a_cpu_model():
    assert wan_runner.latent_storage_device("cpu", plan_windows(20, 4, 2)) == torch.device("cpu")
    assert wan_runner.latent_storage_device("cuda:0", plan_windows(3, 4, 2)) == torch.device("cuda:0")
    assert wan_runner.latent_storage_device("cuda:0", plan_windows(20, 4, 2)) == torch.device("cpu")
