"""PD-FGC expression encoder (`FanEncoder`) with the module names of the published `pd_fpg.pth`.

A FAN trunk (one hourglass) turns an aligned 224x224 face crop into a 512-d descriptor; four heads split it into
head pose (6), eye (6), emotion (30) and mouth (512) features. FlashPortrait conditions on these 554 numbers per
driving frame. Parameter and buffer names follow the published checkpoint exactly so that it loads strictly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.checkpoints import unwrap_state_dict

CROP_SIZE = 224
HEADPOSE_DIM = 6
EYE_DIM = 6
EMO_DIM = 30
MOUTH_DIM = 512
FEATURE_DIM = HEADPOSE_DIM + EYE_DIM + EMO_DIM + MOUTH_DIM  # 554
HOURGLASS_DEPTH = 4
HOURGLASS_CHANNELS = 256
LANDMARK_HEATMAPS = 68
CHECKPOINT_FILE = "pd_fpg.pth"


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN pre-activation residual block: three 3x3 convs of out/2, out/4, out/4 channels, concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half, quarter = out_channels // 2, out_channels // 4
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = _conv3x3(half, quarter)
        self.bn3 = nn.BatchNorm2d(quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        # The skip path only exists when the width changes (checkpoint keys `downsample.0` BN, `downsample.2` conv).
        self.downsample = (
            nn.Sequential(
                nn.BatchNorm2d(in_channels),
                nn.ReLU(),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=False),
            )
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(F.relu(self.bn1(x)))
        out2 = self.conv2(F.relu(self.bn2(out1)))
        out3 = self.conv3(F.relu(self.bn3(out2)))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), dim=1) + residual


class HourGlass(nn.Module):
    """Recursive hourglass; blocks are registered flat as `b1_{level}`, `b2_{level}`, `b2_plus_1`, `b3_{level}`."""

    def __init__(self, depth: int, channels: int) -> None:
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(channels, channels))
            self.add_module(f"b2_{level}", ConvBlock(channels, channels))
            if level == 1:
                self.add_module(f"b2_plus_{level}", ConvBlock(channels, channels))
            self.add_module(f"b3_{level}", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        upper = self._modules[f"b1_{level}"](x)
        lower = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        if level > 1:
            lower = self._level(level - 1, lower)
        else:
            lower = self._modules[f"b2_plus_{level}"](lower)
        lower = self._modules[f"b3_{level}"](lower)
        # Odd sizes (7 -> 3) make the upsample target explicit rather than a fixed factor of 2.
        lower = F.interpolate(lower, size=upper.shape[-2:], mode="bilinear", align_corners=False)
        return upper + lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FanTrunk(nn.Module):
    """FAN with one hourglass; the 68 landmark heatmaps are squeezed to a 28x28 map and projected to 512."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, HOURGLASS_CHANNELS)
        self.m0 = HourGlass(HOURGLASS_DEPTH, HOURGLASS_CHANNELS)
        self.top_m_0 = ConvBlock(HOURGLASS_CHANNELS, HOURGLASS_CHANNELS)
        self.conv_last0 = nn.Conv2d(HOURGLASS_CHANNELS, HOURGLASS_CHANNELS, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(HOURGLASS_CHANNELS)
        self.l0 = nn.Conv2d(HOURGLASS_CHANNELS, LANDMARK_HEATMAPS, kernel_size=1)
        self.bn5 = nn.BatchNorm2d(LANDMARK_HEATMAPS)
        self.conv6 = nn.Conv2d(LANDMARK_HEATMAPS, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(28 * 28, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # 112x112
        x = F.max_pool2d(self.conv2(x), 2)  # 56x56
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        x = self.bn_end0(self.conv_last0(x))
        heatmaps = self.l0(F.relu(x))  # [B, 68, 56, 56]
        squeezed = self.conv6(F.relu(self.bn5(heatmaps)))  # [B, 1, 28, 28]
        return self.fc(F.relu(squeezed.flatten(1)))


def _head() -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.BatchNorm1d(512), nn.Linear(512, 512))


def _embed(out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Linear(512, out_dim))


class FanEncoder(nn.Module):
    """PD-FGC motion encoder: aligned crops [B, 3, 224, 224] RGB in [-1, 1] -> dict of per-part features."""

    def __init__(self) -> None:
        super().__init__()
        self.model = FanTrunk()
        self.to_mouth = _head()
        # Present in the checkpoint, unused by FlashPortrait (the mouth feature is the raw `to_mouth` output).
        self.mouth_embed = _embed(512 - HEADPOSE_DIM - EYE_DIM)
        self.to_headpose = _head()
        self.headpose_embed = _embed(HEADPOSE_DIM)
        self.to_eye = _head()
        self.eye_embed = _embed(EYE_DIM)
        self.to_emo = _head()
        self.emo_embed = _embed(EMO_DIM)

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = self.model(crops)
        return {
            "headpose": self.headpose_embed(self.to_headpose(trunk)),
            "eye": self.eye_embed(self.to_eye(trunk)),
            "emo": self.emo_embed(self.to_emo(trunk)),
            "mouth": self.to_mouth(trunk),
        }


def _check_crops(crops: torch.Tensor) -> None:
    if not isinstance(crops, torch.Tensor):
        raise TypeError(f"crops must be a torch.Tensor [B, 3, {CROP_SIZE}, {CROP_SIZE}], got {type(crops).__name__}")
    if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
        raise ValueError(
            f"crops must have shape [B, 3, {CROP_SIZE}, {CROP_SIZE}] (aligned RGB face crops), got {list(crops.shape)}; "
            "align frames with align_face_crops first"
        )
    if crops.shape[0] == 0:
        raise ValueError("crops is empty: pass at least one aligned face crop")
    if not crops.is_floating_point():
        raise ValueError(f"crops must be floating point in [-1, 1], got dtype {crops.dtype}")


def use_channels_last(encoder: nn.Module) -> nn.Module:
    """Store the encoder's convolution weights channels-last (once; later calls are free).

    The FAN trunk is all convolutions: in this layout the CPU kernels run it markedly faster (measured in
    benchmarks/expression_speed.py), with the same results up to float rounding.
    """
    kernels = [p for p in encoder.parameters() if p.ndim == 4]
    if kernels and not kernels[0].is_contiguous(memory_format=torch.channels_last):
        encoder.to(memory_format=torch.channels_last)
    return encoder


# On a CPU the trunk's activations (256 channels at 56x56) of a few crops fit in cache and of many do not:
# micro-batches of 4 ran 1.3x faster than 16 on the 2-core test machine (and 1.2x faster than one at a time).
CPU_MICRO_BATCH = 4


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matrix products inside the block; the settings are restored after.

    cuDNN uses TF32 for float32 convolutions unless told otherwise: on an H200 that moved the PD-FGC features by
    3.5e-3 (relative norm) from the exact ones, against 3e-6 with TF32 off (benchmarks/expression_devices.py).
    The encoder is a small part of an extraction's time on a GPU, so it always runs in full float32.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def expression_features(encoder: FanEncoder, crops: torch.Tensor, cpu_forward: bool = True) -> torch.Tensor:
    """Aligned crops [B, 3, 224, 224] in [-1, 1] -> features [B, 554] = headpose 6 | eye 6 | emo 30 | mouth 512.

    Runs in eval mode (BatchNorm running statistics) without autograd, in the encoder's device and dtype,
    channels-last, without TF32 (`full_float32`); on a CPU in micro-batches of CPU_MICRO_BATCH (each crop's
    features do not depend on the others in eval mode). A float32 `FanEncoder` on the CPU runs the
    inference-only forward of `pdfgc_cpu` (same features up to float32 rounding, faster); `cpu_forward=False`
    runs the module's own forward instead.
    """
    _check_crops(crops)
    if encoder.training:
        encoder.eval()
    parameter = next(encoder.parameters())
    on_cpu = parameter.device.type == "cpu"
    forward = _module_forward
    if cpu_forward and on_cpu and parameter.dtype == torch.float32 and isinstance(encoder, FanEncoder):
        from .pdfgc_cpu import cached_cpu_plan, cpu_expression_forward

        plan = cached_cpu_plan(encoder)

        def forward(module: nn.Module, part: torch.Tensor) -> torch.Tensor:
            return cpu_expression_forward(module, plan, part)
    else:
        use_channels_last(encoder)
    crops = crops.to(device=parameter.device, dtype=parameter.dtype).contiguous(memory_format=torch.channels_last)
    step = CPU_MICRO_BATCH if on_cpu else crops.shape[0]
    with torch.inference_mode(), full_float32():
        return torch.cat([forward(encoder, part) for part in crops.split(step)])


def _module_forward(encoder: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    parts = encoder(crops)
    return torch.cat([parts["headpose"], parts["eye"], parts["emo"], parts["mouth"]], dim=1)


def load_fan_encoder(state_dict: Mapping[str, object]) -> FanEncoder:
    """Build a `FanEncoder` in eval mode from the `pd_fpg.pth` state dict, checking every key strictly."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of tensors (the contents of {CHECKPOINT_FILE}), "
                        f"got {type(state_dict).__name__}")
    weights = unwrap_state_dict(dict(state_dict), CHECKPOINT_FILE)
    encoder = FanEncoder()
    expected = encoder.state_dict()
    # BatchNorm counters are bookkeeping only; older saves lack them and they never change the output.
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    if unexpected and not missing:
        # The published loader is non-strict: a complete encoder saved with extra entries still loads.
        logging.getLogger(__name__).warning("%s: ignoring %d keys that are not part of the encoder: %s",
                                            CHECKPOINT_FILE, len(unexpected), unexpected[:5])
        weights = {k: v for k, v in weights.items() if k in expected}
    elif missing:
        raise ValueError(
            f"not a PD-FGC expression encoder checkpoint (expected {CHECKPOINT_FILE} from FrancisRing/FlashPortrait): "
            f"{len(missing)} missing keys (e.g. {missing[:5]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:5]})"
        )
    wrong_shape = [
        f"{k}: {list(weights[k].shape)} != {list(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(v.shape)
    ]
    if wrong_shape:
        raise ValueError(
            f"PD-FGC checkpoint has tensors of the wrong shape (expected {CHECKPOINT_FILE}): {wrong_shape[:5]}"
        )
    for key, value in expected.items():
        weights.setdefault(key, value)
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval()


def _calibration_crops(generator: torch.Generator, count: int) -> torch.Tensor:
    """Smooth random images in [-1, 1]: low-frequency structure like a face crop, plus fine texture."""
    coarse = torch.rand(count, 3, 7, 7, generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)
    texture = torch.randn(count, 3, CROP_SIZE, CROP_SIZE, generator=generator) * 0.1
    return (smooth + texture).clamp(-1, 1)


def random_fan_encoder_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights in the exact format of `pd_fpg.pth`, for tests without the published file.

    Weights use PyTorch's default initialisation; BatchNorm affine terms are perturbed, and running statistics
    are measured on smooth random images (one train-mode pass), so activations stay finite and O(1) on real
    face crops. Deterministic for a given seed; the global RNG state is left untouched.
    """
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        encoder = FanEncoder()
    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(1 + 0.2 * (torch.rand(norm.weight.shape, generator=generator) - 0.5))
            norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average: running stats become exactly the calibration batch stats
        encoder.train()
        encoder(_calibration_crops(generator, count=4))
        for norm in norms:
            norm.momentum = 0.1
            # Few calibration samples can leave near-constant channels; a floor keeps real inputs from exploding.
            floor = 0.1 * norm.running_var.mean()
            norm.running_var.clamp_(min=float(floor))
            norm.num_batches_tracked.zero_()
    encoder.eval()
    return {key: value.detach().clone() for key, value in encoder.state_dict().items()}
