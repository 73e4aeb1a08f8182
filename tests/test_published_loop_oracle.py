"""The sampler against an independent oracle of the published denoising loop, through ComfyUI's Wan model.

The oracle is written from the published method's description (reference facts), not from the pack's code: its
own window plan (stride length - overlap, the last window moved back to end at the last frame), per-window emotion
tokens (each window encodes its own video frames 4s..4e and splits them over its own length), the four guidance
branches, the diffusers flow-matching Euler grid, Euler steps of each window's latents, and the sequential linear
cross-fade of the stepped latents after every step but the first. Only the model call is shared: the tiny
format-faithful FlashPortrait model in ComfyUI's Wan model, one pass at a time.
"""
from __future__ import annotations

import pytest
import torch

from pack import import_pack
from tiny_nodes import tiny_folders, tiny_model, tiny_vae  # noqa: F401 (fixtures)

pack = import_pack()
import comfy.utils  # noqa: E402

nodes = pack.nodes
conditioning_core = pack.flashportrait_core.conditioning
wan_patch = nodes.wan_patch

NUM_VIDEO_FRAMES = 29  # 8 latent frames
WINDOW, OVERLAP = 4, 2  # windows (0, 4), (2, 6), (4, 8): three, the last one end-aligned
STEPS, SHIFT, SEED = 4, 5.0, 11


def oracle_sigmas(steps: int, shift: float) -> list[float]:
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    sigma_min = shifted(1 / 1000)
    grid = [1 + i * (sigma_min - 1) / max(1, steps - 1) for i in range(steps)]
    return [shifted(s) for s in grid] + [0.0]


def oracle_windows(frames: int, length: int, overlap: int) -> list[tuple[int, int]]:
    if frames <= length:
        return [(0, frames)]
    windows, start = [], 0
    while start + length < frames:
        windows.append((start, start + length))
        start += length - overlap
    windows.append((frames - length, frames))
    return windows


def oracle_tokens(encoder, features: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[e - s, 97, D]: local latent frame j takes tokens [96j - 73, 96j + 23] of the window's flattened frame
    tokens, real ones first, then zeros for the positions before the window."""
    clip = conditioning_core.portrait_encoder.encode_expression_features(encoder, features[4 * start:4 * (end - 1) + 1],
                                                                         1000)
    flat = clip.reshape(-1, clip.shape[-1])
    rows = []
    for j in range(end - start):
        wanted = range(96 * j - 73, 96 * j + 24)
        real = [flat[i] for i in wanted if i >= 0]
        rows.append(torch.stack(real + [torch.zeros(flat.shape[-1])] * (97 - len(real))))
    return torch.stack(rows)


def oracle_video(model, vae, positive, negative, clip_output, reference, encoder, features, emo_cfg, text_cfg,
                 ip_scale, height, width):
    inner = model.model
    frames = (NUM_VIDEO_FRAMES - 1) // 4 + 1
    sigmas = oracle_sigmas(STEPS, SHIFT)
    windows = oracle_windows(frames, WINDOW, OVERLAP)
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, 16, frames, height // 8, width // 8), generator=generator)

    # Every window's image-to-video condition: the reference at local frame 0, mid-grey after it, frame 0 known.
    image = comfy.utils.common_upscale(reference[:1].movedim(-1, 1), width, height, "lanczos", "disabled")
    pixels = torch.full((4 * (WINDOW - 1) + 1, height, width, 3), 0.5)
    pixels[0] = image.movedim(1, -1)[0].clamp(0, 1)
    reference_latent = vae.encode(pixels)
    mask = torch.ones((1, 1, WINDOW, height // 8, width // 8))
    mask[:, :, 0] = 0
    concat = inner.concat_cond(noise=latents[:, :, :WINDOW], device="cpu", concat_latent_image=reference_latent,
                               concat_mask=mask)
    clip_features = clip_output.penultimate_hidden_states

    def model_velocity(x, sigma, prompt, tokens, strength):
        # The model's own options carry the emotion-attention block patches the loader registered.
        options = dict(model.model_options.get("transformer_options", {}))
        options[wan_patch.EMOTION_OPTIONS_KEY] = wan_patch.EmotionPass(tokens[None], strength)
        denoised = inner.apply_model(x, torch.tensor([sigma]), c_concat=concat, c_crossattn=prompt,
                                     clip_fea=clip_features, transformer_options=options)
        return (x - denoised) / sigma

    for step in range(STEPS):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        kept = torch.zeros_like(latents)
        covered = 0
        for start, end in windows:
            x = latents[:, :, start:end]
            tokens = oracle_tokens(encoder, features, start, end)
            posi = model_velocity(x, sigma, positive, tokens, ip_scale)
            if emo_cfg > 1:
                no_emo = model_velocity(x, sigma, positive, tokens, 0.0)
                if text_cfg != 1:
                    no_cond = model_velocity(x, sigma, negative, tokens, 0.0)
                    v = no_cond + text_cfg * (no_emo - no_cond) + emo_cfg * (posi - no_emo)
                else:
                    v = no_emo + emo_cfg * (posi - no_emo)
            elif text_cfg != 1:
                no_text = model_velocity(x, sigma, negative, tokens, ip_scale)
                v = no_text + text_cfg * (posi - no_text)
            else:
                v = posi
            stepped = x + (sigma_next - sigma) * v
            shared = max(0, covered - start)
            if step > 0 and shared > 0:
                for j in range(shared):
                    a = j / (shared - 1) if shared > 1 else 0.0
                    stepped[:, :, j] = a * stepped[:, :, j] + (1 - a) * kept[:, :, start + j]
            kept[:, :, start:end] = stepped
            covered = end
        latents = kept
    return inner.process_latent_out(latents)


@pytest.fixture(scope="module")
def inputs(tiny_folders):
    positive, negative, clip_output = nodes.conditioning.FlashPortraitLoadConditioning.execute(
        "tiny_prompt.safetensors").result
    encoder = nodes.loaders.FlashPortraitPortraitEncoderLoader.execute("portrait_encoder_tiny.safetensors").result[0]
    features = torch.randn(NUM_VIDEO_FRAMES, 554, generator=torch.Generator().manual_seed(3))
    reference = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(1))
    return positive, negative, clip_output, encoder, features, reference


@pytest.mark.parametrize("emo_cfg, text_cfg, passes", [(4.0, 1.0, 2), (4.0, 2.5, 3), (1.0, 2.5, 2), (1.0, 1.0, 1)])
def test_sampler_equals_the_published_loop(tiny_model, tiny_vae, inputs, emo_cfg, text_cfg, passes):
    positive, negative, clip_output, encoder, features, reference = inputs
    ip_scale = 0.8
    emotion = conditioning_core.emotion_conditioning.build_emotion_conditioning(encoder, features, ip_scale,
                                                                                emo_cfg, text_cfg)
    windows = nodes.windows.WindowSettings(WINDOW, OVERLAP)
    output = nodes.sampler.FlashPortraitSampler.execute(tiny_model, positive, negative, clip_output, tiny_vae,
                                                        reference, emotion, windows, SEED, STEPS, SHIFT, 48)
    latents, report = output.result[0]["samples"], output.result[1]
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    expected = oracle_video(tiny_model, tiny_vae, positive[0][0], negative[0][0], clip_output, reference, encoder,
                            features, emo_cfg, text_cfg, ip_scale, height, width)
    assert latents.shape == expected.shape == (1, 16, 8, 6, 6)
    relative = float((latents - expected).norm() / expected.norm())
    assert relative <= 1e-4, relative
    windows_run = len(oracle_windows(8, WINDOW, OVERLAP))
    assert windows_run == 3
    assert f"{windows_run * STEPS * passes} DiT passes" in report.splitlines()[0]
