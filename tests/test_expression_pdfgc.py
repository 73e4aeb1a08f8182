"""PD-FGC FanEncoder: published layout, loading, and features of real aligned face crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashportrait_core.expression import (
    align_face_crops,
    expression_features,
    load_fan_encoder,
    random_fan_encoder_state_dict,
    read_video_frames,
    similarity_to_template,
)
from flashportrait_core.expression.extract import to_uint8
from flashportrait_core.expression.pdfgc import FanEncoder

DRIVING = Path(__file__).resolve().parents[1] / "../shared/data/driving"

# Key names and shapes of the published pd_fpg.pth (FAN trunk under `model.`, four heads).
PUBLISHED_KEYS = {
    "model.conv1.weight": (64, 3, 7, 7),
    "model.conv1.bias": (64,),
    "model.bn1.running_var": (64,),
    "model.conv2.conv1.weight": (64, 64, 3, 3),
    "model.conv2.downsample.0.running_mean": (64,),
    "model.conv2.downsample.2.weight": (128, 64, 1, 1),
    "model.conv4.downsample.2.weight": (256, 128, 1, 1),
    "model.m0.b1_4.conv1.weight": (128, 256, 3, 3),
    "model.m0.b2_4.bn1.weight": (256,),
    "model.m0.b2_plus_1.conv3.weight": (64, 64, 3, 3),
    "model.m0.b3_1.bn3.running_mean": (64,),
    "model.top_m_0.conv2.weight": (64, 128, 3, 3),
    "model.conv_last0.weight": (256, 256, 1, 1),
    "model.bn_end0.running_var": (256,),
    "model.l0.weight": (68, 256, 1, 1),
    "model.bn5.weight": (68,),
    "model.conv6.weight": (1, 68, 3, 3),
    "model.fc.weight": (512, 784),
    "to_mouth.0.weight": (512, 512),
    "to_mouth.2.running_mean": (512,),
    "to_headpose.3.weight": (512, 512),
    "to_eye.2.running_var": (512,),
    "to_emo.3.bias": (512,),
    "mouth_embed.1.weight": (500, 512),
    "headpose_embed.1.weight": (6, 512),
    "eye_embed.1.weight": (6, 512),
    "emo_embed.1.weight": (30, 512),
}


@pytest.fixture(scope="module")
def random_state_dict() -> dict[str, torch.Tensor]:
    return random_fan_encoder_state_dict(seed=0)


@pytest.fixture(scope="module")
def real_crops() -> torch.Tensor:
    """Four aligned 224x224 crops of a real driving video, aligned with MediaPipe points."""
    from flashportrait_core.expression.mediapipe_backend import MediaPipeFaceBackend

    frames, _ = read_video_frames(DRIVING / "lp_d0.mp4", max_frames=40)
    frames = frames[::13][:4]  # spread over the clip: different expressions
    with MediaPipeFaceBackend() as backend:
        track = backend.detect(to_uint8(frames))
    assert track.found.all()
    return align_face_crops(frames, similarity_to_template(torch.from_numpy(track.points)))


def test_parameter_count_matches_published_encoder() -> None:
    encoder = FanEncoder()
    parameters = sum(p.numel() for p in encoder.parameters())
    state_numel = sum(t.numel() for k, t in encoder.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert parameters == 9_035_727
    assert state_numel == pytest.approx(9.05e6, rel=0.002)  # weights + BatchNorm running statistics


def test_published_key_names_and_shapes() -> None:
    state = FanEncoder().state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    # Width-preserving blocks have no skip conv, and only the innermost hourglass level has `b2_plus`.
    assert not any(k.startswith("model.conv3.downsample") for k in state)
    assert not any(k.startswith("model.m0.b2_plus_2") for k in state)
    assert len(state) == 387
    hourglass_blocks = {k.split(".")[2] for k in state if k.startswith("model.m0.")}
    assert hourglass_blocks == {f"b{p}_{lvl}" for p in (1, 2, 3) for lvl in (1, 2, 3, 4)} | {"b2_plus_1"}


def test_intermediate_shapes(real_crops: torch.Tensor) -> None:
    encoder = FanEncoder().eval()
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("m0", "l0", "conv6", "fc"):
        module = getattr(encoder.model, name)
        module.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, tuple(out.shape)))
    with torch.inference_mode():
        parts = encoder(real_crops[:1])
    assert seen == {"m0": (1, 256, 56, 56), "l0": (1, 68, 56, 56), "conv6": (1, 1, 28, 28), "fc": (1, 512)}
    assert {k: tuple(v.shape) for k, v in parts.items()} == {
        "headpose": (1, 6), "eye": (1, 6), "emo": (1, 30), "mouth": (1, 512)
    }


def test_random_state_dict_is_deterministic_and_complete(random_state_dict: dict[str, torch.Tensor]) -> None:
    again = random_fan_encoder_state_dict(seed=0)
    other = random_fan_encoder_state_dict(seed=1)
    assert again.keys() == random_state_dict.keys() == FanEncoder().state_dict().keys()
    assert all(torch.equal(again[k], random_state_dict[k]) for k in again)
    assert not torch.equal(other["model.fc.weight"], random_state_dict["model.fc.weight"])
    # Running statistics were measured, not left at the 0/1 defaults.
    assert random_state_dict["model.bn5.running_var"].min() > 0
    assert not torch.allclose(random_state_dict["to_mouth.2.running_mean"], torch.zeros(512))


def test_load_accepts_nested_and_rejects_foreign(random_state_dict: dict[str, torch.Tensor]) -> None:
    encoder = load_fan_encoder({"state_dict": random_state_dict})
    assert not encoder.training
    assert torch.equal(encoder.model.fc.weight, random_state_dict["model.fc.weight"])
    load_fan_encoder({"model": random_state_dict})
    load_fan_encoder({f"module.{k}": v for k, v in random_state_dict.items()})
    # Older saves without BatchNorm counters still load.
    load_fan_encoder({k: v for k, v in random_state_dict.items() if not k.endswith("num_batches_tracked")})
    # A complete encoder saved with extra entries loads, as with the published non-strict loader.
    superset = load_fan_encoder({**random_state_dict, "training_step": torch.zeros(1)})
    assert torch.equal(superset.model.fc.weight, random_state_dict["model.fc.weight"])

    broken = dict(random_state_dict)
    del broken["to_emo.3.weight"]
    broken["decoder.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"pd_fpg\.pth.*to_emo\.3\.weight.*decoder\.weight"):
        load_fan_encoder(broken)
    wrong = dict(random_state_dict)
    wrong["emo_embed.1.weight"] = torch.zeros(20, 512)
    with pytest.raises(ValueError, match="emo_embed.1.weight"):
        load_fan_encoder(wrong)


def test_features_of_real_crops(random_state_dict: dict[str, torch.Tensor], real_crops: torch.Tensor) -> None:
    encoder = load_fan_encoder(random_state_dict)
    features = expression_features(encoder, real_crops)
    assert features.shape == (4, 554)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # O(1) activations on real faces, and different frames give different features.
    assert 0.05 < features.std().item() < 20
    assert features.abs().max().item() < 100
    assert (features[0] - features[3]).abs().max() > 1e-3
    # A second run gives identical numbers, laid out headpose 6 | eye 6 | emo 30 | mouth 512 (raw `to_mouth`).
    assert torch.equal(expression_features(encoder, real_crops), features)
    with torch.inference_mode():
        parts = encoder(real_crops)
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(features, torch.cat([parts["headpose"], parts["eye"], parts["emo"], parts["mouth"]],
                                                   dim=1), **close)
    torch.testing.assert_close(features[:, :6], parts["headpose"], **close)
    torch.testing.assert_close(features[:, 12:42], parts["emo"], **close)
    torch.testing.assert_close(features[:, 42:], parts["mouth"], **close)


def test_expression_features_rejects_bad_crops() -> None:
    encoder = FanEncoder().eval()
    with pytest.raises(ValueError, match=r"\[B, 3, 224, 224\]"):
        expression_features(encoder, torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="floating point"):
        expression_features(encoder, torch.zeros(1, 3, 224, 224, dtype=torch.uint8))


@pytest.fixture(scope="module")
def six_crops(real_crops: torch.Tensor) -> torch.Tensor:
    return torch.cat([real_crops, real_crops.flip(-1)[:2]])  # a full micro-batch of 4 and a remainder


@pytest.fixture(scope="module")
def published_features(random_state_dict: dict[str, torch.Tensor], six_crops: torch.Tensor) -> torch.Tensor:
    return _published_per_crop(random_state_dict, six_crops)


def test_channels_last_micro_batches_give_the_same_features(random_state_dict: dict[str, torch.Tensor],
                                                            six_crops: torch.Tensor,
                                                            published_features: torch.Tensor) -> None:
    from flashportrait_core.expression.pdfgc import CPU_MICRO_BATCH

    encoder = load_fan_encoder(random_state_dict)
    crops = six_crops
    seen: list[int] = []
    handle = encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    features = expression_features(encoder, crops, cpu_forward=False)  # the module's own forward
    handle.remove()
    assert seen == [CPU_MICRO_BATCH, 6 - CPU_MICRO_BATCH]  # cache-sized micro-batches on the CPU
    assert encoder.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # The published layout (PyTorch's default), one forward per crop: the same numbers up to float rounding.
    torch.testing.assert_close(features, published_features, rtol=1e-4, atol=1e-4)


def _published_per_crop(state_dict: dict[str, torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    """The published way: PyTorch's default layout, the module's forward, one crop at a time."""
    reference = load_fan_encoder(state_dict)
    with torch.inference_mode():
        parts = [reference(crop[None].contiguous()) for crop in crops]
    return torch.cat([torch.cat([p["headpose"], p["eye"], p["emo"], p["mouth"]], dim=1) for p in parts])


def test_cpu_forward_matches_the_published_forward(random_state_dict: dict[str, torch.Tensor],
                                                   six_crops: torch.Tensor, published_features: torch.Tensor) -> None:
    from flashportrait_core.expression.pdfgc_cpu import build_cpu_plan, cpu_expression_forward

    encoder = load_fan_encoder(random_state_dict)
    crops = six_crops
    features = expression_features(encoder, crops)
    expected = published_features
    # Float32 rounding only: folded BatchNorms and a different summation order.
    relative = ((features - expected).abs().max() / expected.abs().max()).item()
    assert relative < 1e-4
    assert (features - expected).abs().max().item() > 0  # it is the other forward that ran
    # The same numbers up to rounding with plain channels-last convolutions instead of prepacked weights.
    plain = build_cpu_plan(encoder, prepack=False)
    with torch.inference_mode():
        unpacked = cpu_expression_forward(encoder, plain, crops[:1].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(unpacked, features[:1], rtol=1e-4, atol=1e-4)


def test_cpu_forward_follows_new_weights(random_state_dict: dict[str, torch.Tensor],
                                         real_crops: torch.Tensor) -> None:
    encoder = load_fan_encoder(random_state_dict)
    before = expression_features(encoder, real_crops[:1])
    with torch.no_grad():  # written in place, as load_state_dict does: the prepared weights must be rebuilt
        encoder.model.conv1.weight.mul_(0.5)
        encoder.to_mouth[3].bias.add_(1.0)
    after = expression_features(encoder, real_crops[:1])
    changed = {key: value.clone() for key, value in encoder.state_dict().items()}
    torch.testing.assert_close(after, _published_per_crop(changed, real_crops[:1]), rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 0.5


def test_cpu_forward_runs_on_an_encoder_loaded_in_inference_mode(random_state_dict: dict[str, torch.Tensor],
                                                                 real_crops: torch.Tensor) -> None:
    # ComfyUI loads and runs nodes under torch.inference_mode, whose tensors keep no version counter.
    with torch.inference_mode():
        encoder = load_fan_encoder(random_state_dict)
        features = expression_features(encoder, real_crops[:2])
    expected = expression_features(load_fan_encoder(random_state_dict), real_crops[:2])
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def _tf32_settings() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def set_tf32():
    """Sets the process's TF32 settings as a host might (convolutions, matrix products); restores them after."""
    saved = _tf32_settings()

    def set_to(convolutions: bool, matmul: bool) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = convolutions, matmul

    yield set_to
    set_to(*saved)


@pytest.mark.parametrize("cpu_forward", [True, False])
def test_encoder_runs_without_tf32_and_leaves_the_settings_as_they_were(random_state_dict: dict[str, torch.Tensor],
                                                                      six_crops: torch.Tensor, cpu_forward: bool,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      set_tf32) -> None:
    from flashportrait_core.expression import pdfgc_cpu

    encoder = load_fan_encoder(random_state_dict)
    seen: list[tuple[bool, bool]] = []
    encoder.model.conv1.register_forward_pre_hook(lambda module, args: seen.append(_tf32_settings()))
    # The CPU forward runs its convolutions without the modules: watch the call itself.
    original = pdfgc_cpu.cpu_expression_forward
    monkeypatch.setattr(pdfgc_cpu, "cpu_expression_forward",
                        lambda *args: (seen.append(_tf32_settings()), original(*args))[1])
    set_tf32(True, True)
    expression_features(encoder, six_crops[:2], cpu_forward=cpu_forward)
    assert len(seen) == 1 and seen[0] == (False, False)
    assert _tf32_settings() == (True, True)


def test_tf32_settings_are_restored_after_an_error(set_tf32) -> None:
    from flashportrait_core.expression.pdfgc import full_float32

    set_tf32(True, False)
    with pytest.raises(RuntimeError, match="out of memory"), full_float32():
        assert _tf32_settings() == (False, False)
        raise RuntimeError("CUDA out of memory")
    assert _tf32_settings() == (True, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_features_on_a_gpu_match_the_published_forward(random_state_dict: dict[str, torch.Tensor],
                                                       six_crops: torch.Tensor, published_features: torch.Tensor,
                                                       set_tf32) -> None:
    set_tf32(True, True)  # cuDNN's default for convolutions
    features = expression_features(load_fan_encoder(random_state_dict).cuda(), six_crops.cuda()).cpu()
    # TF32 convolutions moved them by 3.5e-3 (relative norm) on an H200; full float32 by float rounding only.
    relative = ((features - published_features).abs().max() / published_features.abs().max()).item()
    assert relative < 1e-4
