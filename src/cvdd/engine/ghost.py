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
