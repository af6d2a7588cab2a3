"""Several students of one architecture trained as one vectorised model: every step of all seeds at once.

The evaluation protocol trains one student per seed on a few hundred images. On a GPU such a step is bound by
kernel launches, not arithmetic, so k students trained one after the other cost about k times one. Here the k
students' parameters and buffers are stacked along a new leading dimension and one forward runs all of them
through :func:`torch.func.vmap` (convolutions become grouped convolutions, BatchNorm normalises each student's
channels with its own statistics and updates its own running statistics). Every student keeps its own
initialisation, its own batches (its seed's plans) and its own micro-batch BN groups; the summed loss gives each
student exactly its own gradient (the parameters are disjoint), and Adam/AdamW/SGD act element by element, so a
stacked run trains the very students of k separate runs, up to floating-point rounding
(``tests/engine/test_stacked.py``). Members need not share a set: :func:`cvdd.evaluation.evaluate_many` stacks the
soft- and hard-label students of several synthetic sets, each member with its own batches and loss.

The students must share one recipe: the learning-rate schedule, batch size and step count are common. The
stack runs in NCHW (``vmap`` lays the member dimension into the channels; a ``channels_last`` setting does not
apply), in one process, and random layers (dropout) draw their own masks per member, so "the very students of
separate runs" holds for dropout-free architectures (every student of the zoo's CIFAR nets). Throughput figures
(``images_per_s``) are each member's images over the stack's wall time. Under bf16 the BN layers run on fp32
inputs (:func:`fp32_batchnorm`); CPU autocast does not reach inside ``vmap`` at all, so a stack on the CPU
computes in fp32 whatever the precision setting (torch 2.14).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from cvdd import distributed as dd
from cvdd import tracking
from cvdd.config import Recipe
from cvdd.data.sources import FileSplit, TensorSplit
from cvdd.data.specs import DatasetSpec
from cvdd.device import autocast, derive_seed, make_generator, own_global_rng, resolve_precision
from cvdd.engine.ghost import ghost_batchnorm
from cvdd.engine.loop import (
    Batch,
    BatchSource,
    CheckpointClock,
    FitResult,
    Objective,
    build_optimizer,
    evaluate_accuracy,
    hard_label_loss,
    load_checkpoint,
    lr_factor,
    recipe_hash,
    save_checkpoint,
)
from cvdd.errors import ConfigError
from cvdd.models.patching import patched_forwards

log = logging.getLogger(__name__)


class StackedModels(nn.Module):
    """k models of one architecture as one module whose tensors carry a leading member dimension.

    ``params`` and ``buffers`` hold every tensor of the members stacked along dim 0 (parameter ``w`` of shape
    ``s`` becomes ``(k, *s)``); a template copy of the architecture on the ``meta`` device runs them through
    :func:`torch.func.functional_call`. The member modules are kept (not registered) to receive the trained
    weights: :meth:`write_back`.

    Args:
        models: the members, same architecture (same parameter and buffer names and shapes).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ConfigError("stacking needs at least one model")
        shapes = [[(n, t.shape) for n, t in (*m.named_parameters(), *m.named_buffers())] for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ConfigError("stacked models must share one architecture")
        params, buffers = stack_module_state(list(models))
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        self.params = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.param_names])
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"buffer{i}", buffers[n].clone())
        # Plain attributes: neither the template nor the members are submodules (their tensors are not ours).
        self.__dict__["template"] = copy.deepcopy(models[0]).to("meta")
        self.__dict__["members"] = list(models)

    @property
    def k(self) -> int:
        """Number of members."""
        return len(self.members)

    def train(self, mode: bool = True) -> StackedModels:
        super().train(mode)
        self.template.train(mode)
        return self

    def _buffers_list(self) -> list[torch.Tensor]:
        return [getattr(self, f"buffer{i}") for i in range(len(self.buffer_names))]

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Run every member on its own input (or all on one shared input).

        Args:
            x: (k, B, 3, S, S), member i's input at ``x[i]``; or (B, 3, S, S) with ``shared=True``.
            shared: every member sees the same ``x``.

        Returns:
            (k, B, num_classes) logits.
        """

        def one(params: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...], inp: torch.Tensor) -> torch.Tensor:
            state = {**dict(zip(self.param_names, params)), **dict(zip(self.buffer_names, buffers))}
            return functional_call(self.template, state, (inp,))

        batched = vmap(one, in_dims=(0, 0, None if shared else 0), randomness="different")
        return batched(tuple(self.params), tuple(self._buffers_list()), x)

    @torch.no_grad()
    def write_back(self) -> list[nn.Module]:
        """Copy each member's slice of the stacked tensors into its own module; return the members."""
        for i, member in enumerate(self.members):
            for name, p in zip(self.param_names, self.params):
                member.get_parameter(name).copy_(p[i])
            for name, b in zip(self.buffer_names, self._buffers_list()):
                member.get_buffer(name).copy_(b[i])
        return list(self.members)


def fp32_batchnorm(model: nn.Module) -> contextlib.AbstractContextManager[int]:
    """Run every BatchNorm layer of ``model`` on an fp32 copy of its input (for bf16 autocast under ``vmap``).

    Autocast leaves BatchNorm to its input's dtype, so after a bf16 convolution it normalises bf16 activations
    with fp32 running statistics. A plain CUDA forward and backward accept that mix; under ``vmap`` (the stack's
    batching rule for batch norm) CUDA's backward refuses it: "Expected running_mean to have type BFloat16 but
    got Float" (seen on an H200, torch 2.11, 2026-11-27). In fp32 the layer's maths is the usual one, and the next
    convolution casts back to bf16 under autocast.

    Yields:
        The number of BN layers patched.
    """

    def wrap(layer: nn.Module, original: Any) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return original(x.float())

        return forward

    return patched_forwards([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], wrap)


def member_losses(logits: torch.Tensor, members: Sequence[Batch], objectives: Sequence[Objective]) -> torch.Tensor:
    """Each member's loss on its micro-batch, with as few calls as the objectives allow.

    Members whose objectives compute the same per-row function (equal ``rowwise_key``, with ``per_row``; see
    :func:`cvdd.engine.loop.hard_label_loss`) are scored in one call on their concatenated rows: with 18 stacked
    students that is two loss computations per step instead of 18. The rest (an online teacher) one by one.

    Args:
        logits: (k, m, C) the members' logits.
        members: the k micro-batches (m rows each).
        objectives: the k objectives.

    Returns:
        (k,) losses, each the mean over its member's rows, as ``objective(logits[j], members[j])``.
    """
    k, m = logits.shape[:2]
    groups: dict[Any, list[int]] = {}
    for j, obj in enumerate(objectives):
        rowwise = hasattr(obj, "per_row") and (not getattr(obj, "needs_soft", False) or members[j].soft is not None)
        groups.setdefault(("rows", obj.rowwise_key) if rowwise else ("member", j), []).append(j)  # type: ignore[attr-defined]
    parts, order = [], []
    for (kind, _), idx in groups.items():
        batch = _concat([members[j] for j in idx]) if kind == "rows" else None
        if batch is None:  # one by one: an online teacher, or batches that cannot be concatenated
            parts += [objectives[j](logits[j], members[j]).unsqueeze(0) for j in idx]
        else:
            rows = logits if len(idx) == k else logits[idx]
            per_row = objectives[idx[0]].per_row  # type: ignore[attr-defined]
            parts.append(per_row(rows.reshape(-1, rows.shape[-1]), batch).view(len(idx), m).mean(1))
        order += idx
    out = torch.cat(parts)
    if order == list(range(k)):
        return out
    position = [0] * k
    for pos, j in enumerate(order):
        position[j] = pos
    return out[position]


def _concat(batches: Sequence[Batch]) -> Batch | None:
    """The rows of several micro-batches as one batch for a per-row loss (inputs left out: per-row losses do
    not read them); None when their optional fields disagree (CutMix in some, soft labels in some)."""

    def cat(field: str) -> torch.Tensor | None:
        values = [getattr(b, field) for b in batches]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(field)
        return torch.cat(values)

    try:
        labels = cat("labels")
        assert labels is not None
        return Batch(batches[0].inputs.new_empty(0), labels, cat("soft"), cat("mix_labels"), cat("mix_lam"))
    except ValueError:
        return None


def fit_stacked(
    models: Sequence[nn.Module],
    sources: Sequence[BatchSource] | BatchSource,
    test: TensorSplit | FileSplit | None,
    recipe: Recipe,
    *,
    spec: DatasetSpec,
    device: torch.device,
    seeds: Sequence[int],
    objective: Objective | Sequence[Objective] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint: str | None = None,
    identity: dict[str, Any] | None = None,
) -> list[FitResult]:
    """Train k models of one architecture at once, each as :func:`cvdd.engine.fit` would with its seed.

    Args:
        models: the k members (trained in place: their final weights are written back).
        sources: one :class:`~cvdd.engine.loop.BatchSource` per member, each drawing epoch ``e`` from
            ``derive_seed(seeds[i], "epoch", e)`` as ``fit`` does. Members given the same source object share its
            batches when the source says its batches do not depend on the generator (``seed_independent``, as
            stored soft labels, where every seed replays the same plans). One source instead of a list: every
            member shares its batches, drawn with the first seed.
        test: the test split, evaluated per member after the last epoch (and every ``recipe.eval_every``).
        recipe: the common recipe (one process; ``compile`` is not supported, channels_last is ignored).
        spec: dataset spec.
        device: where to train.
        seeds: the members' run seeds (aligned with ``models``; members of different sets may repeat a seed).
        objective: loss of one member's micro-batch, as in ``fit`` (default cross-entropy); or one per member.
        progress: one progress bar for the stack.
        desc: progress-bar label.
        checkpoint: path of the stack's epoch checkpoint (``recipe.checkpoint_every_s``; resumed when it matches
            this run).
        identity: extra fields that must match for the checkpoint to be resumed.

    Returns:
        One :class:`~cvdd.engine.loop.FitResult` per member; ``seconds`` is the stack's wall time and
        ``images_per_s`` each member's images over it.
    """
    from tqdm import tqdm

    recipe.validate()
    if recipe.compile:
        raise ConfigError("stacked students cannot be compiled; turn off compile or stack_seeds")
    if dd.world() > 1:
        raise ConfigError("stacked students train in one process; under torchrun evaluate them one by one")
    k = len(models)
    if k != len(seeds):
        raise ConfigError(f"{k} models but {len(seeds)} seeds")
    all_shared = not isinstance(sources, Sequence)
    member_sources: list[BatchSource] = [sources] * k if all_shared else list(sources)  # type: ignore[list-item]
    if len(member_sources) != k:
        raise ConfigError(f"{k} models but {len(member_sources)} batch sources")
    # One batch stream per distinct draw: a member reads the stream of the first member it shares batches with.
    streams: list[tuple[BatchSource, int]] = []  # (source, seed whose generator draws it)
    stream_of: list[int] = []
    keys: dict[Any, int] = {}
    for j, src in enumerate(member_sources):
        key = id(src) if all_shared or getattr(src, "seed_independent", False) else ("member", j)
        if key not in keys:
            keys[key] = len(streams)
            streams.append((src, seeds[j]))
        stream_of.append(keys[key])
    shared = len(streams) == 1  # one forward input for all members (vmap broadcasts it)
    if len({(src.steps_per_epoch, src.num_samples) for src, _ in streams}) != 1:
        raise ConfigError("stacked members need sets of the same size (the same steps and batches per epoch)")
    steps_per_epoch = streams[0][0].steps_per_epoch
    objectives = list(objective) if isinstance(objective, Sequence) else [objective] * k
    if len(objectives) != k:
        raise ConfigError(f"{k} models but {len(objectives)} objectives")
    default = hard_label_loss(recipe.label_smoothing)
    losses_of = [o if o is not None else default for o in objectives]
    precision = resolve_precision(recipe.precision, device)
    # The members stay where they are (the stack holds the device copy); each visits the device to be evaluated.
    stack = StackedModels(models).to(device)
    optimizer = build_optimizer(stack, recipe, leading_dims=1)
    run_hash = recipe_hash(recipe, {"seeds": list(seeds), "stacked": True, **(identity or {})})
    start_epoch, state = load_checkpoint(checkpoint, run_hash, stack, optimizer, desc, recipe.epochs)
    histories: list[list[dict[str, Any]]] = state.get("histories", [[] for _ in range(k)])

    t_start = time.perf_counter()
    clock = CheckpointClock(recipe.checkpoint_every_s)
    seen = 0
    ghost = recipe.ghost_bn and recipe.micro_batch > 0
    lr = recipe.lr
    with contextlib.ExitStack() as patches:
        patches.enter_context(own_global_rng(device))
        if precision == "bf16":
            patches.enter_context(fp32_batchnorm(stack.template))
        if ghost:
            patches.enter_context(ghost_batchnorm(stack.template, recipe.micro_batch))
        for epoch in range(start_epoch, recipe.epochs):
            stack.train()
            iters = [src.epoch(epoch, make_generator(derive_seed(sd, "epoch", epoch), device)) for src, sd in streams]
            # vmap's dropout draws from the global RNG: seeded per epoch so that a resumed run replays its masks.
            torch.manual_seed(derive_seed(streams[0][1], "global", epoch))
            loss_sum = torch.zeros(k, device=device)
            correct = torch.zeros(k, dtype=torch.int64, device=device)
            n_epoch = 0  # images each member trained on
            t_epoch = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{recipe.epochs}", leave=False,
                       disable=not progress, unit="step")  # fmt: skip
            for i, batches in enumerate(zip(*iters)):
                lr = recipe.lr * lr_factor(recipe, epoch * steps_per_epoch + i, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                total = len(batches[0])
                groups = [[b] for b in batches] if ghost else [b.split(recipe.micro_batch) for b in batches]
                for micros in zip(*groups):
                    members = [micros[stream_of[j]] for j in range(k)]
                    inputs = members[0].inputs if shared else torch.stack([mb.inputs for mb in members])
                    with autocast(device, precision):
                        logits = stack(inputs, shared=shared).float()
                    losses = member_losses(logits, members, losses_of)
                    (losses.sum() * (len(members[0]) / total)).backward()
                    loss_sum += losses.detach() * len(members[0])
                    labels = members[0].labels.expand(k, -1) if shared else torch.stack([mb.labels for mb in members])
                    correct += (logits.detach().argmax(-1) == labels).sum(1)
                    n_epoch += len(members[0])
                optimizer.step()
                bar.update()
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t_epoch
            seen += n_epoch
            last = epoch + 1 == recipe.epochs
            evaluate = test is not None and (last or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0))
            losses_h, correct_h = loss_sum.tolist(), correct.tolist()
            for j in range(k):
                histories[j].append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": losses_h[j] / max(1, n_epoch),
                        "train_acc": correct_h[j] / max(1, n_epoch),
                        "lr": lr,
                        "seconds": seconds,
                        "images_per_s": n_epoch / max(seconds, 1e-9),
                    }
                )
            if checkpoint is not None and clock.due(last):  # before the test pass, as in `fit`
                save_checkpoint(checkpoint, run_hash, epoch + 1, stack, optimizer, {"histories": histories})
            members = stack.write_back() if evaluate else []
            for j in range(k):
                if evaluate:
                    assert test is not None
                    histories[j][-1]["test_acc"] = _evaluate_member(members[j], test, spec, device, recipe)
                tracking.log(f"{desc} member {j} (seed {seeds[j]})", histories[j][-1], epoch + 1)
            log.info("%s epoch %d/%d: %.2f s for %d members", desc, epoch + 1, recipe.epochs, seconds, k)
    elapsed = time.perf_counter() - t_start
    members = stack.write_back()
    results = []
    for j, member in enumerate(members):
        acc = histories[j][-1].get("test_acc") if histories[j] else None
        if acc is None and test is not None:
            acc = _evaluate_member(member, test, spec, device, recipe)
            if histories[j]:
                histories[j][-1]["test_acc"] = acc
        results.append(
            FitResult(
                test_acc=float(acc) if acc is not None else float("nan"),
                history=histories[j],
                seconds=elapsed,
                images_per_s=seen / max(elapsed, 1e-9) if seen else 0.0,
                resumed_from=start_epoch,
            )
        )
    return results


def _evaluate_member(
    member: nn.Module, test: TensorSplit | FileSplit, spec: DatasetSpec, device: torch.device, recipe: Recipe
) -> float:
    """Top-1 of one member on the device, which it leaves again for where it was."""
    home = next(member.parameters()).device
    member.to(device)
    try:
        return evaluate_accuracy(member, test, spec, device, precision=recipe.precision, workers=recipe.workers)
    finally:
        member.to(home)
