"""Inference-only forward of the PD-FGC encoder on the CPU: the features of `FanEncoder.forward`, sooner.

The FAN trunk is pre-activation residual blocks (BatchNorm -> ReLU -> conv, three times, outputs concatenated and
added to the input). In eval mode much of its time on a CPU is spent passing over memory between convolutions,
not in them. This forward computes the same function with fewer passes and allocations:

- each eval-mode BatchNorm is precomputed once as a per-channel scale and shift, applied as one multiply-add
  with the ReLU in place on its result (instead of a normalisation, a new tensor and a ReLU);
- each block adds its three conv outputs straight into the slices of one output tensor (instead of
  concatenating, then adding the skip path into yet another tensor);
- the convolution weights are reordered once into oneDNN's blocked layout ("prepacked") where this PyTorch build
  offers it, so no convolution reorders its weights per call; elsewhere plain channels-last `conv2d` runs.

The results equal the module's forward up to float32 rounding (tests/test_expression_pdfgc.py bounds the
difference), are identical for identical input, and do not depend on the number of threads.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pdfgc import ConvBlock, FanEncoder, HourGlass


@dataclass(frozen=True)
class ChannelAffine:
    """Eval-mode BatchNorm2d as `x * scale + shift`, both [1, C, 1, 1]."""

    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class PreparedConv:
    """A Conv2d with its weight ready for the CPU: oneDNN-prepacked (`packed`) or channels-last."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    padding: list[int]
    stride: list[int]
    packed: bool


@dataclass(frozen=True)
class PreparedBlock:
    norm1: ChannelAffine
    conv1: PreparedConv
    norm2: ChannelAffine
    conv2: PreparedConv
    norm3: ChannelAffine
    conv3: PreparedConv
    skip: tuple[ChannelAffine, PreparedConv] | None  # BatchNorm + 1x1 conv where the width changes


@dataclass
class CpuPlan:
    """Everything the CPU forward needs, derived once from an encoder's weights."""

    fingerprint: tuple
    blocks: dict[int, PreparedBlock]  # by id() of the ConvBlock module
    conv1: PreparedConv
    norm1: ChannelAffine
    conv_last: PreparedConv
    norm_end: ChannelAffine
    landmarks: PreparedConv
    norm5: ChannelAffine
    conv6: PreparedConv


def channel_affine(norm: nn.BatchNorm2d) -> ChannelAffine:
    """The scale and shift that eval-mode `norm` applies to each channel."""
    scale = norm.weight.detach() / torch.sqrt(norm.running_var.detach() + norm.eps)
    shift = norm.bias.detach() - norm.running_mean.detach() * scale
    return ChannelAffine(scale.reshape(1, -1, 1, 1).contiguous(), shift.reshape(1, -1, 1, 1).contiguous())


def _prepack_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


def prepare_conv(conv: nn.Conv2d, prepack: bool) -> PreparedConv:
    """`conv`'s weight prepacked for oneDNN (when `prepack`), else kept channels-last for `conv2d`."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"only ungrouped, undilated convolutions are prepared, got {conv}")
    weight = conv.weight.detach()
    bias = None if conv.bias is None else conv.bias.detach()
    padding, stride = list(conv.padding), list(conv.stride)
    if prepack:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, [1, 1], 1)
        return PreparedConv(packed, bias, padding, stride, packed=True)
    return PreparedConv(weight.contiguous(memory_format=torch.channels_last), bias, padding, stride, packed=False)


def run_conv(conv: PreparedConv, x: torch.Tensor) -> torch.Tensor:
    if conv.packed:
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                       [1, 1], 1, "none", [], "")
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def affine_relu(x: torch.Tensor, affine: ChannelAffine) -> torch.Tensor:
    """relu(x * scale + shift) in one new tensor."""
    return torch.addcmul(affine.shift, x, affine.scale).relu_()


def _prepare_block(block: ConvBlock, prepack: bool) -> PreparedBlock:
    skip = None
    if block.downsample is not None:
        skip = (channel_affine(block.downsample[0]), prepare_conv(block.downsample[2], prepack))
    return PreparedBlock(channel_affine(block.bn1), prepare_conv(block.conv1, prepack),
                         channel_affine(block.bn2), prepare_conv(block.conv2, prepack),
                         channel_affine(block.bn3), prepare_conv(block.conv3, prepack), skip)


def weights_fingerprint(encoder: nn.Module) -> tuple:
    """Changes whenever any parameter or buffer is replaced or written in place (load_state_dict, copy_).

    Tensors made under ``torch.inference_mode`` (ComfyUI loads and runs nodes in it) keep no version
    counter; for those only a replacement is seen.
    """
    return tuple((t.data_ptr(), 0 if t.is_inference() else t._version)
                 for t in encoder.state_dict(keep_vars=True).values())


def build_cpu_plan(encoder: FanEncoder, prepack: bool | None = None) -> CpuPlan:
    """Prepare `encoder` (eval mode, float32, on the CPU) for `cpu_expression_forward`.

    prepack: None = use oneDNN prepacked weights when this PyTorch build has them (checked on a tiny conv).
    """
    if prepack is None:
        prepack = _prepack_available() and _prepack_works()
    trunk = encoder.model
    blocks = {id(module): _prepare_block(module, prepack) for module in encoder.modules()
              if isinstance(module, ConvBlock)}
    return CpuPlan(fingerprint=weights_fingerprint(encoder), blocks=blocks,
                   conv1=prepare_conv(trunk.conv1, prepack), norm1=channel_affine(trunk.bn1),
                   conv_last=prepare_conv(trunk.conv_last0, prepack), norm_end=channel_affine(trunk.bn_end0),
                   landmarks=prepare_conv(trunk.l0, prepack), norm5=channel_affine(trunk.bn5),
                   conv6=prepare_conv(trunk.conv6, prepack))


def _prepack_works() -> bool:
    """Some builds list the oneDNN ops but cannot run them (no AVX2, no oneDNN kernels): try one."""
    try:
        conv = nn.Conv2d(2, 2, kernel_size=3, padding=1)
        x = torch.randn(1, 2, 5, 5).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            got = run_conv(prepare_conv(conv, prepack=True), x)
            expected = conv(x)
        return bool(torch.allclose(got, expected, rtol=1e-4, atol=1e-5))
    except (RuntimeError, NotImplementedError):
        return False


def _block(plan: CpuPlan, module: ConvBlock, x: torch.Tensor) -> torch.Tensor:
    block = plan.blocks[id(module)]
    out1 = run_conv(block.conv1, affine_relu(x, block.norm1))
    out2 = run_conv(block.conv2, affine_relu(out1, block.norm2))
    out3 = run_conv(block.conv3, affine_relu(out2, block.norm3))
    half, quarter = out1.shape[1], out2.shape[1]
    parts = ((slice(0, half), out1), (slice(half, half + quarter), out2), (slice(half + quarter, None), out3))
    if block.skip is not None:
        # The skip conv's output is a fresh tensor: the three outputs are added into its channel slices.
        out = run_conv(block.skip[1], affine_relu(x, block.skip[0]))
        for channels, part in parts:
            out[:, channels].add_(part)
        return out
    out = torch.empty_like(x)  # the input is still needed elsewhere (the hourglass reads it twice)
    for channels, part in parts:
        torch.add(x[:, channels], part, out=out[:, channels])
    return out


def _hourglass(plan: CpuPlan, hourglass: HourGlass, level: int, x: torch.Tensor) -> torch.Tensor:
    modules = hourglass._modules
    upper = _block(plan, modules[f"b1_{level}"], x)
    lower = _block(plan, modules[f"b2_{level}"], F.max_pool2d(x, 2, stride=2))
    if level > 1:
        lower = _hourglass(plan, hourglass, level - 1, lower)
    else:
        lower = _block(plan, modules[f"b2_plus_{level}"], lower)
    lower = _block(plan, modules[f"b3_{level}"], lower)
    lower = F.interpolate(lower, size=upper.shape[-2:], mode="bilinear", align_corners=False)
    return upper.add_(lower)


def _trunk(plan: CpuPlan, trunk: nn.Module, crops: torch.Tensor) -> torch.Tensor:
    x = affine_relu(run_conv(plan.conv1, crops), plan.norm1)  # 112x112
    x = F.max_pool2d(_block(plan, trunk.conv2, x), 2)  # 56x56
    x = _block(plan, trunk.conv4, _block(plan, trunk.conv3, x))
    x = _block(plan, trunk.top_m_0, _hourglass(plan, trunk.m0, trunk.m0.depth, x))
    x = affine_relu(run_conv(plan.conv_last, x), plan.norm_end)
    heatmaps = run_conv(plan.landmarks, x)
    squeezed = run_conv(plan.conv6, affine_relu(heatmaps, plan.norm5))
    return trunk.fc(F.relu(squeezed.flatten(1)))


def cpu_expression_forward(encoder: FanEncoder, plan: CpuPlan, crops: torch.Tensor) -> torch.Tensor:
    """Channels-last float32 crops [B, 3, 224, 224] -> features [B, 554] (headpose | eye | emo | mouth).

    `plan` comes from `build_cpu_plan(encoder)`. Call under torch.inference_mode(); the heads are the encoder's
    own (small) modules.
    """
    trunk = _trunk(plan, encoder.model, crops)
    return torch.cat([encoder.headpose_embed(encoder.to_headpose(trunk)), encoder.eye_embed(encoder.to_eye(trunk)),
                      encoder.emo_embed(encoder.to_emo(trunk)), encoder.to_mouth(trunk)], dim=1)


# Plans live beside their encoder, not on it: copying or pickling an encoder never meets prepacked tensors.
_PLANS: weakref.WeakKeyDictionary[FanEncoder, CpuPlan] = weakref.WeakKeyDictionary()


def cached_cpu_plan(encoder: FanEncoder) -> CpuPlan:
    """The encoder's plan, built on first use and rebuilt when its weights change (the plan copies them)."""
    plan = _PLANS.get(encoder)
    if plan is None or plan.fingerprint != weights_fingerprint(encoder):
        plan = build_cpu_plan(encoder)
        _PLANS[encoder] = plan
    return plan
