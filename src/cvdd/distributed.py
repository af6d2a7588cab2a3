"""torch.distributed for cvdd: one process per device, started by ``torchrun`` (or any launcher that sets the
standard ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables).

How the stages use it:

- recover and relabel split their independent units (recover: (IPC index, class block) units; relabel:
  epochs) across ranks by position, ``unit_index % world == rank``. A unit's seed depends only on its
  position, so a sharded run writes exactly the files a single process would; rank 0 assembles after a
  barrier. The same split without a process group (``--shard i/n``) serves job arrays; ``cvdd merge``
  assembles their output.
- squeeze and evaluate are data parallel: every rank draws the same global batch order and augmentation from
  the same seeded generator, computes the gradient of its share of each batch (whole micro-batches,
  round-robin), and the gradients are summed with one all-reduce per step, so the update equals the
  single-process update up to floating-point summation order. BN running statistics are averaged across
  ranks at the end of each epoch; the test split is evaluated in shards and the counts summed.

Backends: gloo on CPU (what CI tests); on GPUs NCCL for CUDA tensors and gloo for the CPU counters
(:func:`backend_for`), so a multi-node GPU job also needs gloo's network interface (``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cvdd.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default of ``CVDD_WAIT_TIMEOUT_S``: how long a rank may wait at a barrier for the others (2 hours).
WAIT_TIMEOUT_S = 7200

#: The gloo group that barriers use, with :func:`wait_timeout` (None: no group of cvdd's own, use the default).
_WAIT_GROUP: Any = None


def wait_timeout() -> timedelta:
    """How long a rank waits at a barrier for the other ranks: ``CVDD_WAIT_TIMEOUT_S`` seconds (default 2 h).

    Barriers wait for work one rank does while the others are done: the slowest rank's last recover unit or label
    epoch, rank 0 assembling a set (reading every unit, writing and hashing 28 GiB at ImageNet-1K IPC 50). They ran
    on the default group with PyTorch's default timeout (30 minutes for gloo and for cvdd's gloo+NCCL groups),
    which such a wait can exceed; they now run on a gloo group of their own with this timeout. A rank that dies
    closes its gloo connections, and the others stop with an error at once rather than waiting it out. The
    default group keeps PyTorch's timeouts (its rendezvous and the training collectives).
    """
    raw = os.environ.get("CVDD_WAIT_TIMEOUT_S", "")
    try:
        seconds = float(raw) if raw else WAIT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"CVDD_WAIT_TIMEOUT_S must be a number of seconds (got {raw!r})") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"CVDD_WAIT_TIMEOUT_S must be a positive number of seconds (got {raw!r})")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Shard:
    """This process's share of a split of independent units: ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``"i/n"`` (0-based ``i``), as given to ``--shard``."""
        try:
            a, b = text.split("/")
            shard = cls(int(a), int(b))
        except ValueError:
            raise ConfigError(f"--shard takes INDEX/COUNT such as 0/4 (got {text!r})") from None
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ConfigError(f"--shard index must be in 0..COUNT-1 (got {text!r})")
        return shard

    def take(self, items: Sequence[T]) -> list[T]:
        """The items of this shard: every ``count``-th item from position ``index``."""
        return [it for i, it in enumerate(items) if i % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def backend_for(use_cuda: bool) -> str:
    """The process group's backend: gloo on CPUs; on GPUs NCCL for CUDA tensors and gloo for CPU ones.

    A plain ``"nccl"`` group refuses every collective on a CPU tensor ("No backend type associated with device type
    cpu"), and cvdd sums its small counters (epoch loss and accuracy, test counts) on the CPU.
    """
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def init_from_env(device: str | None = None) -> bool:
    """Join the process group described by the launcher's environment, if any.

    Returns:
        True when this process is one of several ranks (a group was created or already existed).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if device in (None, "auto"):
        device = os.environ.get("CVDD_DEVICE") or None  # as resolve_device will read it
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda and device is not None and ":" in str(device):
        # One index for every rank would put them all on one GPU (NCCL refuses, or they share it silently).
        raise ConfigError(
            f"--device {device} under a launcher with {world} ranks: each rank takes its own GPU (cuda:LOCAL_RANK); "
            "pass --device cuda and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    timeout = wait_timeout()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    global _WAIT_GROUP
    dist.init_process_group(backend=backend_for(use_cuda))
    # Barriers get a group of their own: the default group's timeout also bounds its rendezvous and every training
    # collective, which keep PyTorch's defaults.
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    log.info(
        "rank %d of %d joined the process group (%s; barriers wait up to %.0f s)",
        dist.get_rank(),
        world,
        dist.get_backend(),
        timeout.total_seconds(),
    )
    return True


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while others still talk)."""
    global _WAIT_GROUP
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
    _WAIT_GROUP = None


def active() -> bool:
    """Whether several ranks run this job."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes shared files and shows progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank, up to :func:`wait_timeout` (a gloo group of cvdd's own; the default group when cvdd
    did not create the process group)."""
    if active():
        dist.barrier(group=_WAIT_GROUP)


def current_shard() -> Shard:
    """The shard of this rank in the process group (``0/1`` without one)."""
    return Shard(rank(), world())


def all_reduce_gradients(model: nn.Module) -> None:
    """Sum every parameter's gradient across ranks (one flat buffer, one collective).

    Each rank's gradient is already weighted by its micro-batches' share of the global batch, so the sum is
    the gradient of the global batch. A parameter without a gradient on this rank contributes zeros, and one
    without a gradient on any rank gets a zero gradient (one process would leave it None, and AdamW/SGD would then
    skip its weight decay and momentum). Every architecture of the zoo gives every trainable parameter a gradient;
    knowing whether another rank had one would cost a device-to-host sync per step.
    """
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        # In the parameter's own memory layout (channels_last weights): PyTorch's fused CPU optimisers read a
        # gradient with other strides as if it had the parameter's, and silently apply a scrambled update.
        p.grad = torch.empty_like(p).copy_(flat[offset : offset + n].view_as(p))
        offset += n


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) across ranks and take rank 0's integer ones (BN's
    batch counters, which differ when ranks run different numbers of micro-batches), so every rank holds the same
    model."""
    if not active():
        return
    with torch.no_grad():
        for b in model.buffers():
            if not b.is_floating_point():
                dist.broadcast(b, src=0)
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= world()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b))
        offset += n


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (in place); identity with one process."""
    if active():
        dist.all_reduce(value)
    return value


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (all ranks then start from the same weights)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
