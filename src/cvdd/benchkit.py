"""Measurement helpers shared by the benchmarks (``cvdd bench --suite speed``, ``bench/bench_recover.py``).

Nothing here changes what a stage computes: the instruments observe from outside, through module hooks, by
wrapping module-level helpers for the duration of a call, or by re-running one recover iteration from the
public pieces.

* :class:`ModelTimer`: wall-clock seconds inside models' forward and backward passes (hooks on the models).
* :func:`measured`: wall time, CPU time, contention and peak memory (RSS on the CPU, max allocated on CUDA) of
  a block, with :class:`cvdd.device.PhasePeaks`.
* :func:`recover_phases`: init / optimise seconds of a ``cvdd.recover`` call.
* :class:`UnitBench`, :func:`time_unit`: one recover iteration (members from
  :func:`cvdd.synthesis.recover.unit_members`) reproduced from the public
  pieces, timed whole and with the experts' forward + loss + backward alone.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cvdd.device import PhasePeaks

if TYPE_CHECKING:
    from cvdd.synthesis.recover import UnitMember


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU), so that a host timer covers the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers once joined)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def machine_busy_seconds() -> float | None:
    """CPU-seconds all processes of the machine spent busy so far (``/proc/stat``), None where unavailable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def rss_mib() -> float | None:
    """Current resident set of this process (MiB) from ``/proc/self/statm``; None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_line(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
    )


# --------------------------------------------------------------------------------------------------------------
# Time inside the models
# --------------------------------------------------------------------------------------------------------------


class ModelTimer:
    """Explicit timers around models' forward and backward passes, installed as hooks.

    * forward: from the model's forward pre-hook to its forward hook (the whole forward of the module);
    * backward: from the moment autograd delivers the gradient of the model's output (a hook on the output
      tensor) to the last accumulation into one of its parameters' ``.grad`` (post-accumulate-grad hooks): the
      model's own backward, without the loss's. Models without trainable parameters (frozen teachers) only
      have forward time.

    With ``train_only`` a forward of a model in eval mode is not counted (the test evaluation that follows
    training). On a CPU the boundaries read the wall clock; on CUDA they record CUDA events (no host sync at a
    boundary, so the timed pipeline runs as it would untimed: a ResNet-18 backward has 62 parameter hooks), read
    once when the timer exits. Hooks are removed on exit, and models can be added while the timer is active
    (:meth:`add`).

    Attributes:
        forward_s, backward_s: seconds inside the models' forward and backward passes (complete after exit).
        forwards: forward calls counted; images: their batch sizes summed.
    """

    def __init__(
        self, models: Iterable[nn.Module] = (), device: torch.device | None = None, train_only: bool = True
    ) -> None:
        self.device = device or torch.device("cpu")
        self.train_only = train_only
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.forwards = 0
        self.images = 0
        self._handles: list[Any] = []
        self._pending: list[nn.Module] = list(models)
        self._active = False
        self._cuda = self.device.type == "cuda"
        self._t_fwd: Any = None
        self._t_bwd0: Any = None
        self._t_bwd1: Any = None
        self._bwd_seen = False
        self._spans: list[tuple[str, Any, Any]] = []  # CUDA: (forward|backward, start event, end event)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    def _now(self) -> Any:
        """A time point: perf_counter seconds on a CPU, a recorded CUDA event on CUDA."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _span(self, kind: str, start: Any, end: Any) -> None:
        if self._cuda:
            self._spans.append((kind, start, end))
        elif kind == "forward":
            self.forward_s += end - start
        elif end > start:
            self.backward_s += end - start

    def _flush(self) -> None:
        if self._t_bwd0 is not None and self._bwd_seen:
            self._span("backward", self._t_bwd0, self._t_bwd1)
        self._t_bwd0 = self._t_bwd1 = None
        self._bwd_seen = False

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.train_only and not module.training:
            self._t_fwd = None
            return
        self._flush()  # the previous backward is over once the next forward starts
        self._t_fwd = self._now()

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._t_fwd is None:
            return
        self._span("forward", self._t_fwd, self._now())
        self._t_fwd = None
        self.forwards += 1
        if args and isinstance(args[0], torch.Tensor):
            self.images += int(args[0].shape[0])
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._bwd_start)

    def _bwd_start(self, grad: torch.Tensor) -> None:
        self._flush()
        self._t_bwd0 = self._now()
        if self._cuda:  # one end event per backward, recorded again at every parameter: the last one counts
            self._t_bwd1 = torch.cuda.Event(enable_timing=True)

    def _bwd_end(self, param: torch.Tensor) -> None:
        if self._t_bwd0 is None:
            return
        if self._cuda:
            self._t_bwd1.record()
        else:
            self._t_bwd1 = time.perf_counter()
        self._bwd_seen = True

    def add(self, model: nn.Module) -> nn.Module:
        """Time ``model`` too (now if the timer is active, else from :meth:`__enter__`); returns the model."""
        if not self._active:
            self._pending.append(model)
            return model
        self._handles.append(model.register_forward_pre_hook(self._pre))
        self._handles.append(model.register_forward_hook(self._post))
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._bwd_end))
        return model

    def __enter__(self) -> ModelTimer:
        self._active = True
        pending, self._pending = self._pending, []
        for m in pending:
            self.add(m)
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        if self._spans:
            torch.cuda.synchronize(self.device)  # one sync for every recorded span
            for kind, start, end in self._spans:
                seconds = max(0.0, start.elapsed_time(end) / 1000)
                if kind == "forward":
                    self.forward_s += seconds
                else:
                    self.backward_s += seconds
            self._spans.clear()


@contextlib.contextmanager
def optimizer_steps() -> Iterator[dict[str, int]]:
    """Count the optimiser steps taken by any ``torch.optim`` optimiser during the block (``counter["n"]``)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    counter = {"n": 0}

    def hook(*args: Any) -> None:
        counter["n"] += 1

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------------
# Wall time, CPU time, contention and peak memory of a block
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def measured(peaks: PhasePeaks, name: str, device: torch.device) -> Iterator[dict[str, Any]]:
    """Measure a block; the yielded dict is filled on exit.

    Keys: ``wall_s``; ``cpu_s`` (this process and its joined children); ``other_cores`` (busy CPU-seconds of
    the machine minus this process's, per wall second: the contention from other work, None without
    ``/proc/stat``); ``start_rss_mib`` and ``peak_rss_mib`` (the high-water mark of the block alone where
    :class:`PhasePeaks` can reset it, else of the process so far); ``gpu_peak_mib`` (max allocated, CUDA only).
    """
    sync(device)
    peaks.mark(f"{name}:before")  # resets the high-water marks: the next reading is this block's own peak
    rec: dict[str, Any] = {"start_rss_mib": rss_mib()}
    busy0, cpu0 = machine_busy_seconds(), cpu_seconds()
    t0 = time.perf_counter()
    yield rec
    sync(device)
    wall = time.perf_counter() - t0
    busy1, cpu1 = machine_busy_seconds(), cpu_seconds()
    peaks.mark(name)
    rec["wall_s"] = wall
    rec["cpu_s"] = cpu1 - cpu0
    rec["other_cores"] = (
        None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / max(wall, 1e-9))
    )
    rec["peak_rss_mib"] = peaks.peaks[name]
    rec["gpu_peak_mib"] = peaks.peaks.get(f"{name}_gpu")


# --------------------------------------------------------------------------------------------------------------
# Recover: phases of a call, and one iteration reproduced from the public pieces
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recover_phases(device: torch.device, peaks: PhasePeaks | None = None) -> Iterator[dict[str, float]]:
    """Seconds of recover's two phases (``init``, ``optimise``) during the block.

    Wraps the module-level helpers ``_unit_init`` and ``_optimise_unit`` of :mod:`cvdd.synthesis.recover` for the
    duration of the block (nothing in the package is modified; the originals are restored on exit). With
    ``peaks``, the peak memory of each phase is recorded too (``setup`` is recover's own bookkeeping between).
    """
    import importlib

    rec = importlib.import_module("cvdd.synthesis.recover")
    phase = {"init": 0.0, "optimise": 0.0}

    def timed(fn: Any, key: str) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            if peaks is not None:
                peaks.mark("setup")  # recover's own setup (pool, plan) or, between units, the unit's bookkeeping
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            phase[key] += time.perf_counter() - t
            if peaks is not None:
                peaks.mark(key)
            return out

        return inner

    orig = rec._unit_init, rec._optimise_unit
    rec._unit_init, rec._optimise_unit = timed(orig[0], "init"), timed(orig[1], "optimise")
    try:
        yield phase
    finally:
        rec._unit_init, rec._optimise_unit = orig


class UnitBench:
    """One unit's optimisation state for a set of experts, each with its rows, row weights and BN weight.

    Mirrors ``cvdd.synthesis.recover._optimise_unit`` (combination rule ``sum``) from public pieces only
    (``recover_augment``, the experts under ``BNMatching``, cross-entropy + BN loss, a per-expert backward into a
    leaf of the augmented batch, Adam, ``clamp_to_valid``). The experts are called through recover's committee, so
    ``models`` are changed in place as recover changes its own: eval mode, frozen, channels_last when ``cfg`` says.
    """

    def __init__(
        self,
        models: dict[str, nn.Module],
        x0: torch.Tensor,
        targets: torch.Tensor,
        members: dict[str, UnitMember],
        n_cls: int,
        cfg: Any,
        spec: Any,
        device: torch.device,
        seed: int,
    ) -> None:
        from cvdd.data.augment import Normalize
        from cvdd.device import make_generator, resolve_precision
        from cvdd.synthesis.bn_matching import BNMatching
        from cvdd.synthesis.recover import _Committee

        # The experts are called as recover calls them: in the config's layout, compiled when it says so.
        self.committee = _Committee(models, device, channels_last=bool(cfg.channels_last), compile=bool(cfg.compile))
        models = self.committee.models
        self.models, self.members, self.n_cls, self.cfg, self.spec, self.device = (
            models,
            members,
            n_cls,
            cfg,
            spec,
            device,
        )
        self.targets = targets
        self.precision = resolve_precision(cfg.precision, device)
        self.mean, self.std = Normalize(spec).stats(device)
        self.x0 = x0
        self.x = x0.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
        self.jitter = spec.jitter if cfg.jitter is None else cfg.jitter
        self.gen = make_generator(seed, device)
        self.jitter_gen = self.gen if device.type == "cpu" else make_generator(seed)
        self.hooks = {n: BNMatching(models[n], first_multiplier=cfg.first_bn_multiplier) for n in members}
        # The factor of each member's BN loss (W_e, or 1 with per-index groups set on its hook), as recover.
        self.bn_scale = {n: m.bn_factor(self.hooks[n], getattr(cfg, "bn_groups", "block")) for n, m in members.items()}

    def __enter__(self) -> UnitBench:
        for h in self.hooks.values():
            h.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks.values():
            h.__exit__(None, None, None)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        from cvdd.synthesis.jitter import recover_augment

        return recover_augment(
            x,
            self.gen,
            self.spec.image_size,
            self.jitter,
            scale=self.cfg.crop_scale,
            shared_crop=self.cfg.shared_crop,
            jitter_generator=self.jitter_gen,
        )

    def terms(self, subs: dict[str, torch.Tensor], bn_hooks: bool = True) -> Iterator[torch.Tensor]:
        """Each member's term CE_e + r_bn W_e BN_e on its sub-batch, computed (forward) when it is asked for."""
        from cvdd.device import autocast

        for name, m in self.members.items():
            with autocast(self.device, self.precision):
                logits = self.committee.forward(name, subs[name], bn_hooks=bn_hooks)
            ce_rows = nn.functional.cross_entropy(logits.float(), self.targets[m.rows], reduction="none")
            term = (ce_rows * m.row_weights).sum() / self.n_cls
            if bn_hooks:
                term = term + self.cfg.r_bn * self.bn_scale[name] * self.hooks[name].loss()
            yield term

    def loss(self, subs: dict[str, torch.Tensor], bn_hooks: bool = True) -> torch.Tensor:
        """Σ_e CE_e + r_bn W_e BN_e over the members, each on its sub-batch (as recover's loss)."""
        loss = self.x.new_zeros(())
        for term in self.terms(subs, bn_hooks):
            loss = loss + term
        return loss

    def sub_batches(self, xa: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: xa if len(m.rows) == len(xa) else xa.index_select(0, m.rows) for n, m in self.members.items()}

    def full_step(self, t: int, total: int, label: bool = False) -> dict[str, float]:
        """One recover iteration; returns its phase times in seconds (device synchronised at each boundary).

        As recover (combination rule ``sum``): each expert's term is backpropagated as soon as it is computed, into
        a leaf copy of the augmented batch, then the leaf's gradient goes back through the augmentation into the
        pixels. ``forward`` sums the experts' forward + loss segments, ``backward`` their backward segments and the
        augmentation's backward.
        """
        from torch.profiler import record_function

        from cvdd.synthesis.jitter import clamp_to_valid, cosine_lr

        def rf(name: str) -> Any:
            return record_function(name) if label else contextlib.nullcontext()

        d = self.device
        t0 = time.perf_counter()
        with rf("bench::augment"):
            for group in self.opt.param_groups:
                group["lr"] = cosine_lr(t, total, self.cfg.lr)
            xa = self.augment(self.x)
            leaf = xa.detach().requires_grad_(True)
            subs = self.sub_batches(leaf)
            self.opt.zero_grad(set_to_none=True)
        sync(d)
        t1 = time.perf_counter()
        fwd = bwd = 0.0
        terms = self.terms(subs)
        for _ in self.members:
            ta = time.perf_counter()
            with rf("bench::forward+loss"):
                term = next(terms)
            sync(d)
            tb = time.perf_counter()
            with rf("bench::backward"):
                term.backward()
            sync(d)
            fwd += tb - ta
            bwd += time.perf_counter() - tb
        ta = time.perf_counter()
        with rf("bench::backward"):
            xa.backward(leaf.grad)  # through the crop, flip and jitter into the pixels
            anchor = float(getattr(self.cfg, "anchor", 0.0))
            if anchor > 0:
                (anchor * (self.x - self.x0).pow(2).mean()).backward()
        sync(d)
        t3 = time.perf_counter()
        bwd += t3 - ta
        with rf("bench::adam+clamp"):
            self.opt.step()
            clamp_to_valid(self.x, self.mean, self.std)
        sync(d)
        t4 = time.perf_counter()
        return {"augment": t1 - t0, "forward": fwd, "backward": bwd, "step": t4 - t3, "total": t4 - t0}

    def experts_step(self, leaves: dict[str, torch.Tensor], bn_hooks: bool) -> float:
        """The experts' forward + loss + backward alone (each term backpropagated in turn) on fixed leaves."""
        t0 = time.perf_counter()
        for v in leaves.values():
            v.grad = None
        for term in self.terms(leaves, bn_hooks=bn_hooks):
            term.backward()
        sync(self.device)
        return time.perf_counter() - t0

    def fixed_leaves(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            subs = self.sub_batches(self.augment(self.x))
        return {n: s.detach().clone().requires_grad_(True) for n, s in subs.items()}


def time_unit(bench: UnitBench, reps: int, warmup: int) -> dict[str, float]:
    """Median ms of (a) the full iteration and its phases, (b) experts alone with and without BN hooks.

    The three measurements are interleaved (a, b, b without hooks, a, b, ...) so that drift on a shared machine
    (frequency, cache, other processes) affects them alike and the ratio (b) / (a) stays comparable.
    """
    total = warmup + reps
    phases: dict[str, list[float]] = {}
    with_hooks: list[float] = []
    no_hooks: list[float] = []
    leaves: dict[str, torch.Tensor] | None = None
    for t in range(total):
        with bench:  # hooks attached
            p = bench.full_step(t, total)
            if leaves is None:
                leaves = bench.fixed_leaves()
            wh = bench.experts_step(leaves, True)
        nh = bench.experts_step(leaves, False)  # hooks removed
        if t >= warmup:
            for k, v in p.items():
                phases.setdefault(k, []).append(v)
            with_hooks.append(wh)
            no_hooks.append(nh)
    out = {f"full_{k}_ms": median_ms(v) for k, v in phases.items()}
    out["experts_ms"] = median_ms(with_hooks)
    out["experts_nohooks_ms"] = median_ms(no_hooks)
    return out
