"""Name → constructor registry for every architecture cvdd can train or use as a committee member.

One user-facing name (``"resnet18"``) may stand for two different networks: the CIFAR-style net used for
32 px and 64 px datasets and the torchvision net used at 224 px (method doc §1.1 and §1.2). The registry
therefore keeps, per name, up to two builders keyed by *scale*, i.e. by a range of image sizes:

* ``small``: :data:`SMALL_MIN_SIZE` <= size <= :data:`SMALL_MAX_SIZE` (CIFAR-10/100, Tiny-ImageNet, digits);
* ``large``: size >= :data:`LARGE_MIN_SIZE` (ImageNette, ImageNet-1k).

A builder registers the sizes it was designed and tested for (``input_sizes``, e.g. ``(32, 64)``); those
decide which scale slot(s) it occupies, and :func:`create_model` then accepts any size within that scale's
range (a 28 px folder dataset gets the CIFAR-style net). A single builder may cover both scales (the ConvNet
does). Sizes between the ranges, or a scale a name has no builder for (``resnet8`` at 224 px), raise
:class:`~cvdd.errors.ModelError` rather than silently falling back to the wrong kind of network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cvdd.errors import ModelError

__all__ = [
    "LARGE_MIN_SIZE",
    "SMALL_MAX_SIZE",
    "SMALL_MIN_SIZE",
    "Builder",
    "ModelInfo",
    "count_parameters",
    "create_model",
    "first_bn",
    "forward_mflops",
    "list_models",
    "model_info",
    "register_model",
]

#: Smallest image side served by a "small" builder: the CIFAR-style nets downsample 8× and the deepest
#: registered ConvNet 16×, so smaller inputs would leave an empty feature map.
SMALL_MIN_SIZE = 16
#: Largest image side served by a "small" (CIFAR-style) builder.
SMALL_MAX_SIZE = 64
#: Smallest image side served by a "large" (ImageNet-style) builder. The gap (64, 96) is deliberately
#: unsupported: neither family was designed or measured there.
LARGE_MIN_SIZE = 96

#: A builder takes ``(num_classes, image_size)`` and returns a freshly initialised model.
Builder = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """Public description of a registered architecture.

    Attributes:
        name: Lower-case registry name, e.g. ``"resnet18"``.
        family: One of ``"resnet"``, ``"densenet"``, ``"mobilenet"``, ``"shufflenet"``, ``"convnet"``.
        input_sizes: The square image sides the builders were designed and tested for, ascending, over all
            builders of the name. :func:`create_model` accepts any size in the same scale range.
        description: One line per builder, joined with ``"; "``.
    """

    name: str
    family: str
    input_sizes: tuple[int, ...]
    description: str


@dataclass(frozen=True)
class _Variant:
    """One builder of a name, with the sizes it was tested for and the scale slots those sizes occupy."""

    fn: Builder
    input_sizes: tuple[int, ...]
    scales: frozenset[str]
    description: str


@dataclass(frozen=True)
class _Entry:
    """Everything registered under one name. Immutable so a shallow copy of the registry is a snapshot."""

    family: str
    variants: tuple[_Variant, ...]


_REGISTRY: dict[str, _Entry] = {}

_SCALE_RANGES = {"small": f"{SMALL_MIN_SIZE}-{SMALL_MAX_SIZE}", "large": f">= {LARGE_MIN_SIZE}"}


def _scale_of(size: int) -> str | None:
    """Return ``"small"``, ``"large"`` or ``None`` for a size outside both ranges."""
    if SMALL_MIN_SIZE <= size <= SMALL_MAX_SIZE:
        return "small"
    if size >= LARGE_MIN_SIZE:
        return "large"
    return None


def _scales_of(name: str, input_sizes: tuple[int, ...]) -> frozenset[str]:
    """Map registered sizes to the scale slots they occupy; a size outside both ranges is a bug."""
    scales = set()
    for size in input_sizes:
        scale = _scale_of(size)
        if scale is None:
            raise ValueError(
                f"model '{name}': input size {size} is neither small ({_SCALE_RANGES['small']}) "
                f"nor large ({_SCALE_RANGES['large']})"
            )
        scales.add(scale)
    return frozenset(scales)


def register_model(
    name: str, family: str, input_sizes: tuple[int, ...], description: str
) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(num_classes, image_size) -> nn.Module`` under ``name``.

    A name may be registered at most twice: once with small sizes and once with large sizes (or once
    covering both). Registration errors are programming mistakes, hence ``ValueError`` and not
    :class:`~cvdd.errors.ModelError` (which is reserved for the user's input).

    Args:
        name: Lower-case architecture name.
        family: Architecture family, shared by all builders of the name.
        input_sizes: Square image sides the builder was designed and tested for; they decide the scale
            slot(s) it occupies, and any size within those scales' ranges is then accepted.
        description: One-line human-readable description of this builder.

    Returns:
        A decorator that records the builder and returns it unchanged.

    Raises:
        ValueError: If the name is not lower-case, sizes are empty or invalid, the family differs from an
            earlier registration of the name, or the name already has a builder for the same scale.
    """
    if not name or name != name.lower() or name.strip() != name:
        raise ValueError(f"model names must be non-empty and lower-case, got {name!r}")
    sizes = tuple(sorted(set(int(s) for s in input_sizes)))
    if not sizes or sizes[0] <= 0:
        raise ValueError(f"model '{name}': input_sizes must be positive integers, got {input_sizes!r}")
    scales = _scales_of(name, sizes)

    def decorator(fn: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        variant = _Variant(fn=fn, input_sizes=sizes, scales=scales, description=description)
        if existing is None:
            _REGISTRY[name] = _Entry(family=family, variants=(variant,))
            return fn
        if existing.family != family:
            raise ValueError(f"model '{name}' is already registered with family '{existing.family}', not '{family}'")
        taken = set().union(*(v.scales for v in existing.variants)) & scales
        if taken:
            raise ValueError(f"model '{name}' is already registered for {'/'.join(sorted(taken))} inputs")
        # Replace the entry instead of mutating it, so snapshots taken by tests stay valid.
        _REGISTRY[name] = replace(existing, variants=(*existing.variants, variant))
        return fn

    return decorator


def _lookup(name: str) -> tuple[str, _Entry]:
    """Return the normalised name and its entry, or raise a one-line ModelError listing valid names."""
    key = name.strip().lower() if isinstance(name, str) else ""
    entry = _REGISTRY.get(key)
    if entry is None:
        raise ModelError(f"unknown architecture '{name}'; choose one of: {', '.join(list_models())}")
    return key, entry


def _all_sizes(entry: _Entry) -> tuple[int, ...]:
    return tuple(sorted({s for v in entry.variants for s in v.input_sizes}))


def create_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build a freshly initialised model (no pretrained weights are ever downloaded).

    Args:
        name: Registry name, case-insensitive (``"ResNet18"`` from the official scripts also works).
        num_classes: Number of output logits C, >= 1.
        image_size: Square input side; selects the CIFAR-style (16-64 px) or ImageNet-style (>= 96 px) builder.

    Returns:
        A module mapping images ``(N, 3, image_size, image_size)`` to logits ``(N, num_classes)``.

    Raises:
        ModelError: Unknown name, unsupported image size or a non-positive class count.
    """
    key, entry = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model '{key}': num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ModelError(f"model '{key}': image_size must be an integer, got {image_size!r}")
    scale = _scale_of(image_size)
    for variant in entry.variants:
        if scale in variant.scales:
            return variant.fn(num_classes, image_size)
    ranges = " or ".join(
        f"{_SCALE_RANGES[sc]} px" for v in entry.variants for sc in ("small", "large") if sc in v.scales
    )
    sizes = ", ".join(str(s) for s in _all_sizes(entry))
    raise ModelError(
        f"model '{key}' does not support {image_size} px images; supported sizes: {sizes} (any size {ranges})"
    )


def list_models() -> list[str]:
    """Return every registered name, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Describe a registered architecture.

    Args:
        name: Registry name, case-insensitive.

    Returns:
        The :class:`ModelInfo`, with ``input_sizes`` merged over the small and large builders.

    Raises:
        ModelError: If the name is unknown.
    """
    key, entry = _lookup(name)
    return ModelInfo(
        name=key,
        family=entry.family,
        input_sizes=_all_sizes(entry),
        description="; ".join(v.description for v in entry.variants),
    )


def count_parameters(model: nn.Module) -> int:
    """Return the total number of parameter elements (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def forward_mflops(name: str, num_classes: int, image_size: int) -> float:
    """Count the FLOPs of one forward pass on one image, in millions.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls and convolutions
    (one multiply-add = 2 FLOPs) and ignores element-wise ops such as BN, ReLU and pooling.

    Args:
        name: Registry name.
        num_classes: Number of output logits.
        image_size: Square input side.

    Returns:
        FLOPs of a forward pass on a ``(1, 3, image_size, image_size)`` input, divided by 1e6.

    Raises:
        ModelError: Unknown name or unsupported size.
    """
    model = create_model(name, num_classes, image_size)
    # eval(): BN uses running stats, so a batch of one is valid and the count matches inference.
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e6


def first_bn(model: nn.Module) -> nn.BatchNorm2d | None:
    """Return the first ``BatchNorm2d`` in ``model.modules()`` order, or ``None`` if there is none.

    Recovery weights the BN-statistics loss of this layer ×10 (method doc §1.1, last column), so module
    definition order in the architectures matters: the stem BN (or DenseNet's first bottleneck ``bn1``)
    must be registered before any other BN.
    """
    return next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)
