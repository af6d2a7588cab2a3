"""Temporarily replace the ``forward`` of some modules of a network: the one home of that mechanism.

Used by activation checkpointing (:func:`cvdd.models.checkpointed`) and ghost batch norm
(:func:`cvdd.engine.ghost.ghost_batchnorm`). The replacement is an instance attribute, so ``module(x)`` (and its
hooks) call it, and it is removed on exit, also when the block raises, in reverse order (a module listed twice
unwinds to its own forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

Forward = Callable[..., Any]


@contextlib.contextmanager
def patched_forwards(modules: Sequence[nn.Module], wrap: Callable[[nn.Module, Forward], Forward]) -> Iterator[int]:
    """Set ``module.forward = wrap(module, original_forward)`` for each module until the ``with`` block ends.

    Yields:
        The number of modules patched.
    """
    patched: list[tuple[nn.Module, Any]] = []  # (module, its own instance-level forward, if it had one)
    try:
        for module in modules:
            own = module.__dict__.get("forward")
            module.forward = wrap(module, module.forward)  # type: ignore[method-assign]
            patched.append((module, own))
        yield len(patched)
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward  # the class's forward is visible again
            else:
                module.forward = own
