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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def ghost_batchnorm(model: nn.Module, group: int) -> Iterator[int]:
    """Make every ``BatchNorm2d`` of ``model`` in train mode normalise groups of ``group`` consecutive images.

    In eval mode, or for a batch of at most ``group`` images, a layer runs as usual. The original forwards are
    restored on exit, also when the block raises.

    Yields:
        The number of BN layers patched.
    """
    if group < 1:
        raise ValueError(f"ghost batch norm needs a group size >= 1 (got {group})")
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            original = layer.forward
            own = layer.__dict__.get("forward")

            def forward(x: torch.Tensor, _original: Any = original, _layer: nn.Module = layer) -> torch.Tensor:
                if not _layer.training or x.shape[0] <= group:
                    return _original(x)
                return torch.cat([_original(part) for part in x.split(group)])

            layer.forward = forward  # type: ignore[method-assign]
            patched.append((layer, own))
        yield len(layers)
    finally:
        for layer, own in reversed(patched):
            if own is None:
                del layer.forward
            else:
                layer.forward = own
