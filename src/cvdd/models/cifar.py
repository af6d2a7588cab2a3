"""CIFAR-style networks (method doc §1.1), used for 32 px (CIFAR-10/100) and 64 px (Tiny-ImageNet) data.

These follow the widely used "pytorch-cifar" family: a 3×3 stride-1 stem with **no max-pool**, so a
32 px image keeps full resolution in the first stage. The one change the official CV-DD code makes, and
that cvdd keeps, is that global pooling averages over whatever spatial size remains (4×4 at 32 px, 8×8 at
64 px) instead of a fixed 4×4 window; the same weights therefore serve both sizes.

All convolutions are bias-free (each is followed by BN) and every layer keeps PyTorch's default
initialisation, like the reference nets. Attribute names (``conv1``, ``bn1``, ``layer1``, ``shortcut``,
``linear``, ...) follow the pytorch-cifar convention so that raw ``state_dict`` files of the official model
pool can be loaded without renaming keys.

Variants are data: one class per family, parametrised by a frozen spec, and a table of specs registered
in a loop at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvdd.models.registry import Builder, register_model

__all__ = [
    "CIFAR_INPUT_SIZES",
    "DENSENET_SPECS",
    "MOBILENETV2_SPECS",
    "RESNET_SPECS",
    "SHUFFLENETV2_SPECS",
    "CifarDenseNet",
    "CifarMobileNetV2",
    "CifarResNet",
    "CifarShuffleNetV2",
    "DenseNetSpec",
    "MobileNetV2Spec",
    "ResNetSpec",
    "ShuffleNetV2Spec",
]

_SpecT = TypeVar("_SpecT")

#: Image sides the CIFAR-style nets are registered and tested for (CIFAR-10/100 and Tiny-ImageNet); the
#: registry also hands them any other size of its "small" range (16-64 px).
CIFAR_INPUT_SIZES: tuple[int, ...] = (32, 64)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free square convolution with "same" padding for odd kernels (BN follows, so a bias is redundant)."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)


def _global_pool(x: Tensor) -> Tensor:
    """Average over the full remaining spatial extent: ``(N, C, H, W) -> (N, C)``.

    Pooling over the whole map (rather than a fixed 4×4 window) is what lets 64 px inputs work.
    """
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --------------------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------------------


class _Shortcut(nn.Sequential):
    """Projection shortcut conv1×1(stride)+BN, used when the residual changes shape."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(_conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or projection shortcut.

    Shapes: ``(N, in_ch, H, W) -> (N, planes, H / stride, W / stride)``.
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, out_ch, 3)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = (
            _Shortcut(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else nn.Sequential()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4, with an identity or projection shortcut.

    Shapes: ``(N, in_ch, H, W) -> (N, 4 * planes, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv(in_ch, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = (
            _Shortcut(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else nn.Sequential()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


@dataclass(frozen=True)
class ResNetSpec:
    """A CIFAR ResNet variant.

    Attributes:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage.
        widths: Base width (``planes``) per stage; the stage outputs ``planes * block.expansion`` channels.
        strides: Stride of the first block of each stage.
        stem_width: Output channels of the 3×3 stem.
    """

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]
    widths: tuple[int, ...] = (64, 128, 256, 512)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    stem_width: int = 64


class CifarResNet(nn.Module):
    """CIFAR ResNet: conv3×3 stem + BN + ReLU (no max-pool), residual stages, global average pool, Linear.

    Stages are exposed as ``layer1``, ``layer2``, ... (as many as ``spec.layers`` has entries).

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``; the final map is ``H / prod(strides)`` wide.
    """

    def __init__(self, spec: ResNetSpec, num_classes: int) -> None:
        super().__init__()
        if not (len(spec.layers) == len(spec.widths) == len(spec.strides)):
            raise ValueError("ResNetSpec.layers, widths and strides must have the same length")
        self.conv1 = _conv(3, spec.stem_width, 3)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        in_ch = spec.stem_width
        self.stage_names: list[str] = []
        for i, (n_blocks, planes, stride) in enumerate(zip(spec.layers, spec.widths, spec.strides), start=1):
            blocks = []
            for j in range(n_blocks):
                blocks.append(spec.block(in_ch, planes, stride if j == 0 else 1))
                in_ch = planes * spec.block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i}")
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            out = getattr(self, name)(out)
        return self.linear(_global_pool(out))


#: Registered CIFAR ResNets: name -> (spec, description).
RESNET_SPECS: dict[str, tuple[ResNetSpec, str]] = {
    "resnet8": (
        # The classic CIFAR ResNet-8 (6n+2, n=1) of He et al.: narrow enough to train in minutes on a CPU.
        ResNetSpec(BasicBlock, (1, 1, 1), widths=(16, 32, 64), strides=(1, 2, 2), stem_width=16),
        "CIFAR ResNet-8: BasicBlock [1,1,1], widths 16/32/64 (small CPU-friendly expert)",
    ),
    "resnet18": (ResNetSpec(BasicBlock, (2, 2, 2, 2)), "CIFAR ResNet-18: BasicBlock [2,2,2,2], no max-pool"),
    "resnet50": (ResNetSpec(Bottleneck, (3, 4, 6, 3)), "CIFAR ResNet-50: Bottleneck [3,4,6,3], no max-pool"),
    "resnet101": (ResNetSpec(Bottleneck, (3, 4, 23, 3)), "CIFAR ResNet-101: Bottleneck [3,4,23,3], no max-pool"),
}


# --------------------------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------------------------


class DenseBottleneck(nn.Module):
    """BN-ReLU-conv1×1(4k)-BN-ReLU-conv3×3(k); output = concat(new k features, input).

    Shapes: ``(N, C, H, W) -> (N, C + growth, H, W)``.
    """

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv(in_ch, 4 * growth, 1)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = _conv(4 * growth, growth, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        # New features first: channel order matters for loading the official weights.
        return torch.cat([out, x], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1×1 channel reduction followed by 2×2 average pooling.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, H / 2, W / 2)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv = _conv(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


@dataclass(frozen=True)
class DenseNetSpec:
    """A CIFAR DenseNet variant.

    Attributes:
        blocks: Bottlenecks per dense block (always four blocks).
        growth: Growth rate k; the stem outputs ``2k`` channels.
        reduction: Channel compression of each transition (``floor(C * reduction)``).
    """

    blocks: tuple[int, int, int, int]
    growth: int = 32
    reduction: float = 0.5


class CifarDenseNet(nn.Module):
    """CIFAR DenseNet: conv3×3 stem **without BN**, 4 dense blocks, 3 transitions, BN-ReLU, pool, Linear.

    Because the stem has no BN, the first ``BatchNorm2d`` in module order is ``dense1[0].bn1``, which is
    the layer whose statistics recovery weights ×10.

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``; the final map is ``H / 8`` wide.
    """

    def __init__(self, spec: DenseNetSpec, num_classes: int) -> None:
        super().__init__()
        growth = spec.growth
        channels = 2 * growth
        self.conv1 = _conv(3, channels, 3)
        # Definition order = modules() order: dense1, trans1, ..., dense4, bn, linear.
        for i, n_blocks in enumerate(spec.blocks, start=1):
            layers = []
            for _ in range(n_blocks):
                layers.append(DenseBottleneck(channels, growth))
                channels += growth
            setattr(self, f"dense{i}", nn.Sequential(*layers))
            if i < len(spec.blocks):
                out_ch = math.floor(channels * spec.reduction)
                setattr(self, f"trans{i}", Transition(channels, out_ch))
                channels = out_ch
        self.num_dense = len(spec.blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for i in range(1, self.num_dense + 1):
            out = getattr(self, f"dense{i}")(out)
            if i < self.num_dense:
                out = getattr(self, f"trans{i}")(out)
        out = F.relu(self.bn(out))
        return self.linear(_global_pool(out))


DENSENET_SPECS: dict[str, tuple[DenseNetSpec, str]] = {
    "densenet121": (
        DenseNetSpec((6, 12, 24, 16), growth=32),
        "CIFAR DenseNet-121: growth 32, blocks [6,12,24,16], stem conv without BN",
    ),
}


# --------------------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """1×1 expand+BN+ReLU, 3×3 depthwise(stride)+BN+ReLU, 1×1 linear projection+BN.

    A residual is added only at stride 1. Quirk of the reference nets, kept for weight compatibility: when a
    stride-1 block changes the channel count, the residual is a 1×1 conv+BN projection instead of being
    dropped (torchvision drops it). The expansion conv exists even for expansion 1.

    Shapes: ``(N, in_ch, H, W) -> (N, out_ch, H / stride, W / stride)``.
    """

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * in_ch
        self.conv1 = _conv(in_ch, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = _conv(hidden, hidden, 3, stride, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = _conv(hidden, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = _Shortcut(in_ch, out_ch, 1) if stride == 1 and in_ch != out_ch else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


@dataclass(frozen=True)
class MobileNetV2Spec:
    """A CIFAR MobileNetV2 variant.

    Attributes:
        cfg: Inverted-residual stages as (expansion t, channels c, repeats n, first stride s).
        stem_width: Output channels of the stride-1 3×3 stem.
        head_width: Output channels of the final 1×1 conv.
    """

    cfg: tuple[tuple[int, int, int, int], ...]
    stem_width: int = 32
    head_width: int = 1280


class CifarMobileNetV2(nn.Module):
    """CIFAR MobileNetV2: stride-1 stem, inverted residuals, 1×1 head conv, pool, Linear (ReLU, no dropout).

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``; the final map is ``H / 8`` wide with the CIFAR cfg.
    """

    def __init__(self, spec: MobileNetV2Spec, num_classes: int) -> None:
        super().__init__()
        self.conv1 = _conv(3, spec.stem_width, 3)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        blocks = []
        in_ch = spec.stem_width
        for t, c, n, s in spec.cfg:
            for j in range(n):
                blocks.append(InvertedResidual(in_ch, c, t, s if j == 0 else 1))
                in_ch = c
        self.layers = nn.Sequential(*blocks)
        self.conv2 = _conv(in_ch, spec.head_width, 1)
        self.bn2 = nn.BatchNorm2d(spec.head_width)
        self.linear = nn.Linear(spec.head_width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(_global_pool(out))


MOBILENETV2_SPECS: dict[str, tuple[MobileNetV2Spec, str]] = {
    "mobilenetv2": (
        # Second stage uses stride 1 (ImageNet: 2) so a 32 px image ends at 4×4.
        MobileNetV2Spec(
            ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
        ),
        "CIFAR MobileNetV2: stride-1 stem, (6,24,2,1) stage, projection residual on stride-1 width changes",
    ),
}


# --------------------------------------------------------------------------------------------------------
# ShuffleNetV2
# --------------------------------------------------------------------------------------------------------


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels across ``groups``: ``(N, C, H, W) -> (N, C, H, W)``."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBasicBlock(nn.Module):
    """Stride-1 unit: split channels in half, transform the second half, concatenate, shuffle (groups 2).

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_at = int(channels * split_ratio)
        branch = channels - self.split_at
        self.conv1 = _conv(branch, branch, 1)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = _conv(branch, branch, 3, groups=branch)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = _conv(branch, branch, 1)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = x[:, : self.split_at], x[:, self.split_at :]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))  # no ReLU after the depthwise conv, as in ShuffleNetV2
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], dim=1), 2)


class ShuffleDownBlock(nn.Module):
    """Stride-2 unit: both branches see the full input, each yields ``out_ch / 2`` channels, then shuffle.

    Shapes: ``(N, in_ch, H, W) -> (N, out_ch, H / 2, W / 2)``.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        # Left branch: depthwise 3×3 stride 2, then 1×1.
        self.conv1 = _conv(in_ch, in_ch, 3, 2, groups=in_ch)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = _conv(in_ch, mid, 1)
        self.bn2 = nn.BatchNorm2d(mid)
        # Right branch: 1×1, depthwise 3×3 stride 2, 1×1.
        self.conv3 = _conv(in_ch, mid, 1)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, 2, groups=mid)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid, 1)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


@dataclass(frozen=True)
class ShuffleNetV2Spec:
    """A CIFAR ShuffleNetV2 variant.

    Attributes:
        widths: Output channels of the three stages.
        repeats: Stride-1 units after each stage's down-sampling unit.
        stem_width: Output channels of the stride-1 3×3 stem.
        head_width: Output channels of the final 1×1 conv.
    """

    widths: tuple[int, int, int]
    repeats: tuple[int, int, int] = (3, 7, 3)
    stem_width: int = 24
    head_width: int = 1024


class CifarShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2: stride-1 stem (no max-pool), 3 stages, 1×1 head conv, pool, Linear.

    Shapes: ``(N, 3, H, W) -> (N, num_classes)``; the final map is ``H / 8`` wide.
    """

    def __init__(self, spec: ShuffleNetV2Spec, num_classes: int) -> None:
        super().__init__()
        self.conv1 = _conv(3, spec.stem_width, 3)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        in_ch = spec.stem_width
        for i, (width, repeats) in enumerate(zip(spec.widths, spec.repeats), start=1):
            units: list[nn.Module] = [ShuffleDownBlock(in_ch, width)]
            units += [ShuffleBasicBlock(width) for _ in range(repeats)]
            setattr(self, f"layer{i}", nn.Sequential(*units))
            in_ch = width
        self.num_stages = len(spec.widths)
        self.conv2 = _conv(in_ch, spec.head_width, 1)
        self.bn2 = nn.BatchNorm2d(spec.head_width)
        self.linear = nn.Linear(spec.head_width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{i}")(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(_global_pool(out))


SHUFFLENETV2_SPECS: dict[str, tuple[ShuffleNetV2Spec, str]] = {
    "shufflenetv2": (
        ShuffleNetV2Spec(widths=(48, 96, 192)),
        "CIFAR ShuffleNetV2 (net size 0.5): widths 48/96/192, head 1024, no max-pool",
    ),
}


# --------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------


def _builder(model_cls: Callable[[_SpecT, int], nn.Module], spec: _SpecT) -> Builder:
    """Bind a spec to its family class; the image size is unused because global pooling adapts to it."""

    def build(num_classes: int, image_size: int) -> nn.Module:
        del image_size
        return model_cls(spec, num_classes)

    return build


for _name, (_resnet, _desc) in RESNET_SPECS.items():
    register_model(_name, "resnet", CIFAR_INPUT_SIZES, _desc)(_builder(CifarResNet, _resnet))
for _name, (_densenet, _desc) in DENSENET_SPECS.items():
    register_model(_name, "densenet", CIFAR_INPUT_SIZES, _desc)(_builder(CifarDenseNet, _densenet))
for _name, (_mobilenet, _desc) in MOBILENETV2_SPECS.items():
    register_model(_name, "mobilenet", CIFAR_INPUT_SIZES, _desc)(_builder(CifarMobileNetV2, _mobilenet))
for _name, (_shufflenet, _desc) in SHUFFLENETV2_SPECS.items():
    register_model(_name, "shufflenet", CIFAR_INPUT_SIZES, _desc)(_builder(CifarShuffleNetV2, _shufflenet))
