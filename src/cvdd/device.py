"""Device, precision and seeding: the one place that knows about CUDA.

Nothing else in cvdd calls ``.cuda()``: code asks :func:`resolve_device` for a device and moves tensors
there. The device can come from the ``CVDD_DEVICE`` environment variable so the same test suite re-runs on
a GPU machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cvdd.errors import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return the device to run on.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or None. None and ``"auto"`` read
            ``CVDD_DEVICE`` and otherwise pick CUDA when available, else the CPU.

    Returns:
        The resolved :class:`torch.device`.

    Raises:
        ConfigError: the device string is invalid or CUDA was asked for but is unavailable.
    """
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        device = os.environ.get("CVDD_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into ``"bf16"`` where the device runs bf16 natively (CUDA), else ``"fp32"``.

    On CPUs bf16 autocast is usually slower than fp32 (no native bf16 matmul on most), so ``auto``
    keeps fp32 there; ``"bf16"`` can still be forced.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Autocast context for the forward pass; a null context for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (for code paths that use them)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh explicit generator on ``device``: every random draw in cvdd's hot loops comes from one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def derive_seed(seed: int, *keys: int | str) -> int:
    """Derive a stable 63-bit seed from a run seed and a path of keys (unit ids, arch names, ...).

    The derivation is independent of the process and of the order in which units run, so a sharded or
    resumed run gives each unit the seed it would have had in one uninterrupted process.
    """
    import hashlib

    text = ":".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None leaves it unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class PhasePeaks:
    """Peak RSS per phase: reads ``ru_maxrss`` at a phase boundary, then resets the kernel's high-water mark.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets VmHWM (and so ``ru_maxrss``) to the current RSS,
    so the next reading is the peak of the next phase alone. Where that is not possible only the process peak
    (the maximum of all readings) is meaningful and ``per_phase`` is False.

    Args:
        device: the run's device. A CUDA device (``"cuda:1"``) is the one whose peak allocated memory is read,
            also when it is not the current device (one process given ``--device cuda:1``); ``"cpu"`` reads no GPU
            memory; None or ``"auto"`` read ``CVDD_DEVICE``'s device, else the current CUDA device once CUDA is in
            use.
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.peaks: dict[str, float] = {}
        self.per_phase = sys.platform.startswith("linux") and self._reset()
        name = os.environ.get("CVDD_DEVICE") if device is None or str(device) == "auto" else device
        try:
            self._device = torch.device(name) if name and str(name) != "auto" else None
        except (RuntimeError, TypeError):  # an invalid name: resolve_device refuses it in one line, not here
            self._device = None
        if self._on_gpu():  # the first phase starts here on the GPU too, not at the process's earlier peak
            torch.cuda.reset_peak_memory_stats(self._device)

    def _on_gpu(self) -> bool:
        on_gpu = self._device is None or self._device.type == "cuda"
        return on_gpu and torch.cuda.is_available() and torch.cuda.is_initialized()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def mark(self, phase: str) -> None:
        """End ``phase``: record its peak RSS (MiB) and, on CUDA, its peak allocated memory, then start the next."""
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak_rss_mib())
        if self._on_gpu():
            # torch.device("cuda") (no index) means the current device to these calls.
            gpu = torch.cuda.max_memory_allocated(self._device) / 2**20
            self.peaks[f"{phase}_gpu"] = max(self.peaks.get(f"{phase}_gpu", 0.0), gpu)
            torch.cuda.reset_peak_memory_stats(self._device)
        if self.per_phase:
            self._reset()

    @property
    def process(self) -> float:
        """The process peak RSS (MiB): the largest phase peak (GPU readings left out)."""
        return max(v for k, v in self.peaks.items() if not k.endswith("_gpu"))


def own_global_rng(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Give a training run the global RNG (which it reseeds per epoch for dropout) and hand the caller's state back
    afterwards: a notebook's later draws do not depend on whether it trained something in between."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])
