"""Flow-matching schedule and the windowed sampling loop."""
from __future__ import annotations

import pytest
import torch

from flashportrait_core.sampling.guidance import PASSES, combine_guidance, guidance_passes
from flashportrait_core.sampling.loop import sample_flow_windows
from flashportrait_core.sampling.schedules import simple_sigmas
from flashportrait_core.sampling.windows import plan_windows


def test_shifted_sigmas():
    sigmas = simple_sigmas(30, 5.0)
    assert sigmas.shape == (31,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    t = (1000 - 33) / 1000  # the training level ComfyUI's simple scheduler takes second: 1000 - int(1000 / 30)
    assert torch.isclose(sigmas[1], torch.tensor(5 * t / (1 + 4 * t), dtype=torch.float64))
    assert torch.allclose(simple_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


def test_single_window_equals_plain_euler():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 2, 5, 3, 3, generator=gen)
    target = torch.randn(1, 2, 5, 3, 3, generator=gen)
    sigmas = simple_sigmas(6, 3.0)

    def velocity(x, sigma, window, step):  # exact velocity toward a fixed clean sample
        return (x - target) / sigma

    out = sample_flow_windows(noise, sigmas, plan_windows(5, 8, 2), velocity)
    x = noise.clone()
    for i in range(6):
        x = x + (sigmas[i + 1] - sigmas[i]).item() * (x - target) / sigmas[i].item()
    assert torch.allclose(out, x, atol=1e-6)
    assert torch.allclose(out, target, atol=1e-5)  # the exact flow lands on the sample


def test_windows_see_their_slices_and_blend_in_order():
    noise = torch.zeros(1, 1, 9, 1, 1)
    plan = plan_windows(9, 5, 2)
    calls = []

    def velocity(x, sigma, window, step):
        calls.append((window, step, x.shape[2]))
        return torch.full_like(x, float(window + 1))

    out = sample_flow_windows(noise, torch.tensor([1.0, 0.0], dtype=torch.float64), plan, velocity)
    assert calls == [(0, 0, 5), (1, 0, 5), (2, 0, 5)]
    # One step from sigma 1 to 0 at step 0: x = -v, where each frame takes the last window covering it.
    assert out.flatten().tolist() == [-1, -1, -1, -2, -3, -3, -3, -3, -3]


@pytest.mark.parametrize("emo_cfg, text_cfg, passes", [
    (4.0, 1.0, ("posi", "no_emo")),
    (4.0, 2.0, ("posi", "no_emo", "no_cond")),
    (1.0, 2.0, ("posi", "no_text")),
    (1.0, 1.0, ("posi",)),
])
def test_guidance_branches_as_published(emo_cfg, text_cfg, passes):
    predictions = {"posi": torch.tensor(3.0), "no_emo": torch.tensor(2.0), "no_cond": torch.tensor(1.0),
                   "no_text": torch.tensor(0.5)}
    assert guidance_passes(emo_cfg, text_cfg) == passes
    expected = {  # written out from the published loop, branch by branch
        ("posi", "no_emo"): 2.0 + emo_cfg * (3.0 - 2.0),
        ("posi", "no_emo", "no_cond"): 1.0 + text_cfg * (2.0 - 1.0) + emo_cfg * (3.0 - 2.0),
        ("posi", "no_text"): 0.5 + text_cfg * (3.0 - 0.5),
        ("posi",): 3.0,
    }[passes]
    assert combine_guidance({name: predictions[name] for name in passes}, emo_cfg, text_cfg).item() == expected


def test_guidance_passes_read_the_published_prompts_and_emotion():
    assert (PASSES["posi"].negative_prompt, PASSES["posi"].emotion) == (False, True)
    assert (PASSES["no_emo"].negative_prompt, PASSES["no_emo"].emotion) == (False, False)
    assert (PASSES["no_cond"].negative_prompt, PASSES["no_cond"].emotion) == (True, False)
    assert (PASSES["no_text"].negative_prompt, PASSES["no_text"].emotion) == (True, True)  # ip_scale as set
