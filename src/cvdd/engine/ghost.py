"""Ghost batch normalisation: one forward of a whole batch whose BN layers see it as consecutive micro-batches.

A recipe with ``micro_batch`` m runs each optimiser step as several forwards of m images, because BatchNorm
statistics in train mode are computed per forward (and BSSL labels were made for exactly those groups). On a GPU, a
student step on a few hundred 32 px images is bound by kernel launches, so k forwards of m images cost about k times
one forward of k·m. Inside :func:`ghost_batchnorm`, every ``BatchNorm2d`` in train mode splits its input into
consecutive groups of m along the batch and runs its own forward on each group in turn: the normalisation and the
running statistics (updated once per group, in order) are those of the micro-batch forwards, while every other
layer runs once on the whole batch. Layers that mix samples other than BN would break the equivalence; the zoo has
none (tests/engine/test_ghost.py checks loss, gradients and running statistics against micro-batches).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from cvdd.models.patching import patched_forwards


def ghost_batchnorm(model: nn.Module, group: int) -> contextlib.AbstractContextManager[int]:
    """Make every ``BatchNorm2d`` of ``model`` in train mode normalise groups of ``group`` consecutive images.

    In eval mode, or for a batch of at most ``group`` images, a layer runs as usual. The original forwards are
    restored on exit, also when the block raises (:func:`cvdd.models.patching.patched_forwards`).

    Yields:
        The number of BN layers patched.
    """
    if group < 1:
        raise ValueError(f"ghost batch norm needs a group size >= 1 (got {group})")

    def wrap(layer: nn.Module, original: Any) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not layer.training or x.shape[0] <= group:
                return original(x)
            return torch.cat([original(part) for part in x.split(group)])

        return forward

    return patched_forwards([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], wrap)


def grouped_batch_statistics(model: nn.Module, group: int) -> contextlib.AbstractContextManager[int]:
    """Make every BatchNorm of ``model`` that normalises with batch statistics use those of each group of ``group``
    consecutive images, computed for all groups at once (for a frozen teacher: no running statistics change).

    The BSSL teacher labels each student micro-batch with that micro-batch's own BN statistics. Looping over
    the micro-batches costs one forward each; on a GPU, where a relabel epoch of a few hundred 32 px images is
    bound by kernel launches, that is 14 forwards per expert for 100 images in groups of 8. Here one forward
    runs them all: a layer computes each group's mean and biased variance per channel in one fp32 reduction (as
    cuDNN computes them) and applies the normalisation and its affine weights as one multiply-add; a last, smaller
    group (the set's last micro-batch) goes through the layer's own forward. Unlike :func:`ghost_batchnorm`
    nothing is updated, so it applies only to layers that use batch statistics without tracking them (inside
    :func:`cvdd.labels.bssl.bssl_mode`); any other layer runs as usual.

    Yields:
        The number of BN layers patched.
    """
    if group < 1:
        raise ValueError(f"grouped batch statistics need a group size >= 1 (got {group})")

    def wrap(layer: nn.Module, original: Any) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            if not layer.training or layer.track_running_stats or n <= group:
                return original(x)
            full = n - n % group
            head, c = x[:full], x.shape[1]
            groups = full // group
            # Statistics in fp32 from one reduction over each group's rows, laid out so that it reads memory
            # in order: channels innermost for channels_last (the default layout), else spatial innermost.
            if head.dim() == 4 and head.is_contiguous(memory_format=torch.channels_last):
                rows = head.permute(0, 2, 3, 1).reshape(groups, -1, c).float()  # (G, g*H*W, C)
                var, mean = torch.var_mean(rows, dim=1, unbiased=False)
            else:
                rows = head.reshape(groups, group, c, -1).float()  # (G, g, C, H*W)
                var, mean = torch.var_mean(rows, dim=(1, 3), unbiased=False)
            scale = torch.rsqrt(var + layer.eps)  # (G, C)
            if layer.affine:
                scale = scale * layer.weight.float()
                shift = layer.bias.float() - mean * scale
            else:
                shift = -mean * scale
            # The normalisation and the affine map as one multiply-add per element: y = x * scale + shift.
            shape = (groups, 1, c) + (1,) * (head.dim() - 2)
            grouped = head.unflatten(0, (groups, group))
            if grouped.dtype == torch.float32:
                y = torch.addcmul(shift.view(shape), grouped, scale.view(shape)).flatten(0, 1)
            else:  # bf16 activations: scale and shift kept fp32 (rounded, x * scale and shift cancel less exactly)
                y = torch.addcmul(shift.view(shape), grouped.float(), scale.view(shape)).to(x.dtype).flatten(0, 1)
            return y if full == n else torch.cat([y, original(x[full:])])

        return forward

    return patched_forwards([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], wrap)
