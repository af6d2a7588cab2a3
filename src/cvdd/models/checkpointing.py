"""Activation checkpointing of a network's blocks, for the duration of a ``with`` block.

Recover at 224 px keeps every activation of an expert for the backward pass to the pixels; with checkpointing only
the inputs of the network's blocks are kept, and each block's forward is run again during the backward. The
blocks are found by shape, so the same code serves every architecture of the zoo:

* a *block* is a module that holds both a ``BatchNorm2d`` and a convolution, is not itself an ``nn.Sequential``,
  and sits directly in an ``nn.Sequential`` (ResNet's residual blocks, MobileNetV2's inverted residuals, ShuffleNet's
  units; DenseNet's bottleneck layers in the CIFAR version, its four dense blocks in torchvision's);
* other modules are searched below; blocks are not (no nested checkpoints).

BN-matching hooks inside a block fire twice, in the forward and again in the recomputation. The loss uses the
statistics of the first pass, and the recomputation replays the same operations, so gradients are unchanged
(tests/models/test_checkpointing.py checks them against the plain network).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cvdd.models.patching import patched_forwards


def _is_block(module: nn.Module) -> bool:
    has_bn = has_conv = False
    for m in module.modules():
        has_bn = has_bn or isinstance(m, nn.BatchNorm2d)
        has_conv = has_conv or isinstance(m, nn.Conv2d)
    return has_bn and has_conv and not isinstance(module, nn.Sequential)


def checkpoint_blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that :func:`checkpointed` wraps, in ``model.modules()`` order."""
    blocks: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(parent, nn.Sequential) and _is_block(child):
                blocks.append(child)
            else:
                visit(child)

    visit(model)
    return blocks


def checkpointed(model: nn.Module) -> contextlib.AbstractContextManager[int]:
    """Checkpoint every block of ``model`` (see the module docstring) until the ``with`` block ends.

    Each block's ``forward`` is replaced by one that runs under :func:`torch.utils.checkpoint.checkpoint`
    (non-reentrant) when gradients are being recorded, and plainly otherwise; the original ``forward`` is restored
    on exit, also when the block raises (:func:`cvdd.models.patching.patched_forwards`).

    Yields:
        The number of checkpointed blocks.
    """

    def wrap(block: nn.Module, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            # No RNG state to preserve: experts run in eval mode (no dropout), and recover's randomness is drawn
            # outside the networks.
            return checkpoint(original, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        return forward

    return patched_forwards(checkpoint_blocks_of(model), wrap)
