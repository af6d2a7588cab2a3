"""One readable supervised training loop.

``fit`` takes built objects (a model, data splits, a recipe, a device) and returns results. It checkpoints
at the end of an epoch (atomically; at most every ``recipe.checkpoint_every_s`` seconds, and after the last
epoch) and resumes from that checkpoint after an interruption; every
random draw (shuffling, augmentation) comes from a generator derived from the run seed and the epoch, so
a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cvdd import distributed as dd
from cvdd import tracking
from cvdd.artifacts import atomic_torch_save, build_stamp, describe_build, safe_torch_load
from cvdd.config import Recipe
from cvdd.data.augment import Normalize, TrainAugment
from cvdd.data.loader import global_batch_size, make_batches
from cvdd.data.sources import FileSplit, TensorSplit
from cvdd.data.specs import DatasetSpec
from cvdd.device import autocast, derive_seed, make_generator, own_global_rng, resolve_precision
from cvdd.engine.ghost import ghost_batchnorm
from cvdd.errors import ArtifactError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One optimiser step's data, already augmented and normalised on the device.

    Attributes:
        inputs: (B, 3, S, S) float32 normalised images (after any CutMix).
        labels: (B,) int64 class labels of the images (before mixing).
        soft: (B, C) stored teacher logits for these inputs, or None (hard labels or an online teacher).
        mix_labels: (B,) labels of the pasted images when CutMix was applied, else None.
        mix_lam: (B,) fraction of each image that is still its own (1 without CutMix), else None.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    soft: torch.Tensor | None = None
    mix_labels: torch.Tensor | None = None
    mix_lam: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, size: int) -> list[Batch]:
        """Contiguous micro-batches of at most ``size`` images (the student's BN groups)."""
        if size <= 0 or size >= len(self):
            return [self]
        out = []
        for i in range(0, len(self), size):
            sl = slice(i, i + size)
            out.append(
                Batch(
                    self.inputs[sl],
                    self.labels[sl],
                    None if self.soft is None else self.soft[sl],
                    None if self.mix_labels is None else self.mix_labels[sl],
                    None if self.mix_lam is None else self.mix_lam[sl],
                )
            )
        return out


class BatchSource(Protocol):
    """What ``fit`` trains on: a fixed number of steps per epoch, each yielding one :class:`Batch`."""

    steps_per_epoch: int
    num_samples: int

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]: ...


class AugmentedBatches:
    """A real split with the recipe's batched augmentation (random crop / RRC, flip): squeeze's source.

    With several ranks, a streamed (file) split yields only this rank's slice of each global batch
    (``sharded`` is then True); an in-memory split yields whole batches and the loop takes its share.
    """

    def __init__(self, split: TensorSplit | FileSplit, spec: DatasetSpec, recipe: Recipe, device: torch.device) -> None:
        shard = (dd.rank(), dd.world())
        # A streamed split's workers must bring every file to the image size anyway: for rrc_flip they make the
        # random-resized crop there and only the flip is left for the device (each augmentation applied once).
        crop_in_workers = isinstance(split, FileSplit) and recipe.augment == "rrc_flip"
        self.batches = make_batches(
            split,
            spec,
            recipe.batch_size,
            device,
            train=True,
            workers=recipe.workers,
            shard=shard,
            random_crop=crop_in_workers,
        )
        self.augment = TrainAugment(spec, "flip" if crop_in_workers else recipe.augment, recipe.padding)
        self.steps_per_epoch = len(self.batches)
        self.num_samples = self.batches.num_samples
        self.sharded = isinstance(split, FileSplit) and shard[1] > 1
        self.rank = shard[0]

    def global_batch_size(self, step: int) -> int:
        """Images in the whole global batch ``step`` of an epoch, of which a sharded source yields one slice."""
        return global_batch_size(self.num_samples, self.batches.batch_size, step)

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        batches = self.batches.epoch(generator)  # (lazy) its order comes from `generator`, the same on every rank
        aug = generator
        if self.sharded:  # each rank flips and crops its own slice with its own draws, not rank 0's pattern
            # derived from the generator's seed, not drawn from it: its stream orders the global batches exactly as
            # in one process
            aug = make_generator(derive_seed(generator.initial_seed(), "rank", self.rank), generator.device)
        for x, y in batches:
            yield Batch(self.augment(x, aug), y)


# objective(logits (b, C), micro-batch) -> scalar loss, the mean over the micro-batch. It receives the batch so
# a teacher can label exactly the augmented inputs the student sees (online soft labels).
Objective = Callable[[torch.Tensor, Batch], torch.Tensor]


def hard_label_loss(label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy on class labels; with CutMix, the two labels weighted by the pasted area.

    The objective also carries ``per_row`` (logits (B, C), batch) -> (B,) losses whose mean it is, and
    ``rowwise_key``: objectives with equal keys compute the same per-row function, so stacked students can be
    scored in one call (:func:`cvdd.engine.stacked.fit_stacked`).
    """
    ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing, reduction="none")

    def per_row(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        loss = ce(logits, batch.labels)
        if batch.mix_labels is not None and batch.mix_lam is not None:
            loss = batch.mix_lam * loss + (1 - batch.mix_lam) * ce(logits, batch.mix_labels)
        return loss

    def objective(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return per_row(logits, batch).mean()

    objective.per_row = per_row  # type: ignore[attr-defined]
    objective.rowwise_key = ("cross-entropy", label_smoothing)  # type: ignore[attr-defined]
    return objective


@dataclass
class FitResult:
    """What a training run produced.

    Attributes:
        test_acc: top-1 on the test split after the final epoch (fraction in [0, 1]).
        history: one dict per epoch (epoch, train_loss, train_acc, lr, seconds, images_per_s, test_acc?).
        seconds: wall time of the epochs run in this process (excludes resumed ones).
        images_per_s: training throughput over those epochs.
        resumed_from: the epoch the run resumed from (0 for a fresh run).
    """

    test_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    resumed_from: int = 0


def lr_factor(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based), updated every step.

    Linear warm-up over ``warmup_epochs``, then the schedule over the remaining steps. The paper's students step
    their cosine once per epoch; per step is the same curve sampled finer (at CIFAR-10 IPC 10, 7 steps per epoch
    of a 300-epoch run, the two differ by at most one epoch's decay, under 1% of the base lr).
    """
    total = recipe.epochs * steps_per_epoch
    warm = int(recipe.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if recipe.schedule == "constant":
        return 1.0
    if recipe.schedule == "periodic":
        # CosineAnnealingLR(T_max=period) run past T_max, as the official ImageNette squeeze does: the cosine goes
        # on (0 at one period, back to the peak at two), it does not restart at the peak.
        period = recipe.period_epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / period))
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * t / recipe.cosine_eta))


def build_optimizer(model: nn.Module, recipe: Recipe, leading_dims: int = 0) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over the model's trainable parameters (optionally no decay on BN and biases).

    Args:
        model: the model.
        recipe: optimiser, learning rate, weight decay.
        leading_dims: dimensions in front of each parameter's own shape (1 for stacked models,
            :mod:`cvdd.engine.stacked`); BN weights and biases are the parameters with at most one own dimension.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.no_decay_bn_bias:
        decay = [p for p in params if p.ndim - leading_dims > 1]
        no_decay = [p for p in params if p.ndim - leading_dims <= 1]
        groups: list[dict[str, Any]] = [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    # On a CPU PyTorch's default updates one tensor at a time; its fused kernel took 0.28-0.37x the time of an
    # AdamW step (convnet_d3_w64, ResNet-18) and 0.09-0.34x of an SGD step (docs/benchmarks/student-cpu.md).
    # CUDA keeps its default (multi-tensor) until fused is measured there.
    fused = {"fused": True} if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params) else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov, **fused)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, **fused)
    return torch.optim.AdamW(groups, lr=recipe.lr, **fused)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    split: TensorSplit | FileSplit,
    spec: DatasetSpec,
    device: torch.device,
    batch_size: int = 500,
    precision: str = "auto",
    channels_last: bool = False,
    workers: int = 4,
) -> float:
    """Top-1 accuracy (fraction) of ``model`` on a split, in eval mode; the model's mode is restored after.

    With several ranks each evaluates every ``world``-th sample and the counts are summed, so every rank must
    call it.
    """
    if dd.active():
        r, w = dd.rank(), dd.world()
        split = (
            TensorSplit(split.images[r::w], split.labels[r::w])
            if isinstance(split, TensorSplit)
            else FileSplit(split.files[r::w], split.labels[r::w])
        )
    was_training = model.training
    model.eval()
    precision = resolve_precision(precision, device)
    normalize = Normalize(spec)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    batches = make_batches(split, spec, batch_size, device, train=False, workers=workers)
    for x, y in batches.epoch():
        xn = normalize(x)
        if channels_last:
            xn = xn.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(xn)
        correct += (logits.argmax(1) == y).sum()
        total += int(y.shape[0])
    model.train(was_training)
    counts = dd.all_reduce_sum(torch.stack([correct.cpu(), torch.tensor(total)]))
    return float(counts[0]) / max(1, int(counts[1]))


def _my_micro_batches(
    batch: Batch, micro_batch: int, rank: int, world: int, global_size: int | None = None
) -> tuple[list[Batch], int]:
    """This rank's micro-batches of a step and the global batch size that weights their losses.

    One process: all micro-batches of the batch. Several ranks with whole batches: micro-batches
    round-robin, so the summed gradient equals the single-process one (a whole batch without micro-batching is
    cut into ``world`` parts, whose BN layers then normalise each part: not the single-process step). Several
    ranks with sharded batches (``global_size`` given: the images of the whole global batch): all of this rank's
    slice, each image weighted 1 / ``global_size``.
    """
    if world == 1:
        return batch.split(micro_batch), len(batch)
    if global_size is not None:
        return batch.split(micro_batch), global_size
    size = micro_batch if micro_batch > 0 else -(-len(batch) // world)
    return batch.split(size)[rank::world], len(batch)


def recipe_hash(recipe: Recipe, extra: dict[str, Any]) -> str:
    """Short hash of a run's recipe identity and extra fields: a checkpoint resumes only under the same hash."""
    text = json.dumps({"recipe": recipe.identity(), **extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_checkpoint(
    path: str | os.PathLike[str] | None,
    run_hash: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    desc: str,
    epochs: int,
) -> tuple[int, dict[str, Any]]:
    """Restore ``model`` and ``optimizer`` from an epoch checkpoint made by the same run.

    Returns:
        (epochs already done, the checkpoint's dict); (0, {}) when there is none or it belongs to another run
        (a warning says so; the file is left alone and overwritten by this run's next checkpoint).
    """
    if path is None or not Path(path).is_file():
        return 0, {}
    try:
        state = safe_torch_load(Path(path))
    except ArtifactError as exc:  # a checkpoint only saves time: a damaged one costs the epochs, not the run
        log.warning("%s: %s; training from epoch 0", desc, exc)
        return 0, {}
    if not isinstance(state, dict) or state.get("run_hash") != run_hash:
        log.warning("%s: ignoring checkpoint %s made with another recipe or seed", desc, path)
        return 0, {}
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("%s: resuming from epoch %d of %d (%s)", desc, int(state["epoch"]), epochs, path)
    if state.get("build") != build_stamp():
        log.warning(
            "%s: its first %d epochs were trained by %s, not by this %s; the rest may differ at float rounding",
            desc,
            int(state["epoch"]),
            describe_build(state.get("build")),
            describe_build(build_stamp()),
        )
    return int(state["epoch"]), state


def save_checkpoint(
    path: str | os.PathLike[str] | None,
    run_hash: str,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
) -> None:
    """Write the end-of-epoch checkpoint atomically (rank 0); every rank waits until it is on disk."""
    if path is None:
        return
    if dd.is_main():
        state = {
            "run_hash": run_hash,
            "epoch": epoch,
            "build": build_stamp(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        atomic_torch_save({**state, **extra}, Path(path))
    dd.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet


class CheckpointClock:
    """Decides after which epochs the resume checkpoint is written: the last one, and any that ends at least
    ``every_s`` seconds after the previous write (or the start); ``every_s`` 0 means every epoch.

    A checkpoint of a small student costs more than its epoch on a GPU (a ResNet-18 with its AdamW state is 134 MB),
    so writing one per epoch would make checkpoints most of an evaluation's time. Under torch.distributed every
    rank takes rank 0's decision: a write ends in a barrier that all ranks must reach.
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.since = time.perf_counter()

    def due(self, last_epoch: bool) -> bool:
        """Whether to write after the epoch that just ended (resets the clock when it says yes)."""
        now = time.perf_counter()
        due = last_epoch or self.every_s <= 0 or now - self.since >= self.every_s
        due = bool(dd.broadcast_object(due))
        if due:
            self.since = now
        return due


def fit(
    model: nn.Module,
    train: TensorSplit | FileSplit | BatchSource,
    test: TensorSplit | FileSplit | None,
    recipe: Recipe,
    *,
    spec: DatasetSpec,
    device: torch.device,
    seed: int = 0,
    checkpoint: str | os.PathLike[str] | None = None,
    objective: Objective | None = None,
    progress: bool = True,
    desc: str = "train",
    identity: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` with ``recipe`` and report top-1 on ``test``.

    Args:
        model: an ``nn.Module`` (moved to ``device``; trained in place).
        train: training split (uint8 tensors, or files for streamed datasets), augmented with the recipe's
            ``augment``; or any :class:`BatchSource` (evaluate's synthetic sets with CutMix and soft labels).
        test: test split evaluated after the last epoch (and every ``recipe.eval_every`` epochs); None skips it.
        recipe: optimiser, schedule, augmentation, precision, epochs.
        spec: dataset spec (normalisation, image size).
        device: where to train.
        seed: run seed; epoch ``e`` draws its shuffling and augmentation from ``derive_seed(seed, e)``.
        checkpoint: path of the epoch checkpoint (written as ``recipe.checkpoint_every_s`` says); if it exists
            and matches this run it is resumed, and it is kept after the last epoch (the caller removes it once
            the final artifact is written).
        objective: loss of a micro-batch, (logits, batch) -> scalar mean; default cross-entropy with the
            recipe's label smoothing (CutMix-aware). Each step splits its batch into micro-batches of
            ``recipe.micro_batch`` images, weights each micro-batch loss by its share of the batch, and takes
            one optimiser step.
        progress: show a progress bar with loss, accuracy and throughput.
        desc: progress-bar label.
        identity: extra fields that must match for a checkpoint to be resumed (architecture, dataset...).

    Returns:
        A :class:`FitResult`.
    """
    from tqdm import tqdm

    recipe.validate()
    precision = resolve_precision(recipe.precision, device)
    # channels_last by default on every device: on CUDA for tensor cores, on a CPU because oneDNN's NHWC
    # convolutions took 0.65-0.97x the step time of NCHW (docs/benchmarks/switches-cpu.md).
    channels_last = recipe.channels_last if recipe.channels_last is not None else True
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # The compiled wrapper shares the module's parameters and buffers: checkpoints and the result use `model`.
    forward = torch.compile(model, dynamic=False) if recipe.compile else model
    dd.broadcast_module(model)  # every rank starts from rank 0's weights
    ranks, me = dd.world(), dd.rank()
    progress = progress and dd.is_main()
    source: BatchSource = (
        AugmentedBatches(train, spec, recipe, device) if isinstance(train, TensorSplit | FileSplit) else train
    )
    steps_per_epoch = source.steps_per_epoch
    sharded = bool(getattr(source, "sharded", False))
    optimizer = build_optimizer(model, recipe)
    if objective is None:
        objective = hard_label_loss(recipe.label_smoothing)

    run_hash = recipe_hash(recipe, {"seed": seed, **(identity or {})})
    start_epoch, state = load_checkpoint(checkpoint, run_hash, model, optimizer, desc, recipe.epochs)
    history: list[dict[str, Any]] = list(state.get("history", []))

    t_start = time.perf_counter()
    clock = CheckpointClock(recipe.checkpoint_every_s)
    seen = 0
    lr = recipe.lr  # what an epoch without steps records
    ghost = recipe.ghost_bn and recipe.micro_batch > 0 and ranks == 1
    # Restored on exit, also when training raises (an interrupted run leaves the model as it found it).
    with own_global_rng(device), ghost_batchnorm(model, recipe.micro_batch) if ghost else contextlib.nullcontext():
        for epoch in range(start_epoch, recipe.epochs):
            model.train()
            gen = make_generator(derive_seed(seed, "epoch", epoch), device)
            # Dropout draws from the global RNG: seeded per epoch (and rank) so that a resumed run replays the
            # masks an uninterrupted one would have drawn.
            torch.manual_seed(derive_seed(seed, "global", epoch, me))
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            n_epoch = 0  # images this rank trained on
            t_epoch = time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"{desc} {epoch + 1}/{recipe.epochs}",
                leave=False,
                disable=not progress,
                unit="step",
            )
            for i, batch in enumerate(source.epoch(epoch, gen)):
                step = epoch * steps_per_epoch + i
                lr = recipe.lr * lr_factor(recipe, step, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                if ghost:  # the micro-batches as one forward; the BN layers still normalise each one apart
                    micros, batch_total = [batch], len(batch)
                else:
                    global_size = source.global_batch_size(i) if sharded else None  # type: ignore[attr-defined]
                    micros, batch_total = _my_micro_batches(batch, recipe.micro_batch, me, ranks, global_size)
                for micro in micros:
                    inputs = micro.inputs
                    if channels_last:
                        inputs = inputs.contiguous(memory_format=torch.channels_last)
                    with autocast(device, precision):
                        logits = forward(inputs)
                    loss = objective(logits.float(), micro) * (len(micro) / batch_total)
                    loss.backward()
                    # Accumulate on the device; the host only synchronises when the progress bar is refreshed.
                    loss_sum += loss.detach() * batch_total
                    correct += (logits.detach().argmax(1) == micro.labels).sum()
                    n_epoch += len(micro)
                dd.all_reduce_gradients(model)
                optimizer.step()
                bar.update()
                if progress and (i % 20 == 0 or i == steps_per_epoch - 1):
                    el = time.perf_counter() - t_epoch
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / n_epoch:.3f}",
                        acc=f"{correct.item() / n_epoch:.3f}",
                        img_s=f"{n_epoch / max(el, 1e-9):.0f}",
                    )
            bar.close()
            if ranks > 1:
                dd.average_buffers(model)
                totals = dd.all_reduce_sum(
                    torch.stack(
                        [
                            loss_sum.detach().double().cpu(),
                            correct.double().cpu(),
                            torch.tensor(float(n_epoch), dtype=torch.float64),
                        ]
                    )
                )
                loss_sum, correct, n_epoch = totals[0], totals[1], int(totals[2])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t_epoch
            seen += n_epoch
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum.item() / max(1, n_epoch),
                "train_acc": correct.item() / max(1, n_epoch),
                "lr": lr,
                "seconds": seconds,
                "images_per_s": n_epoch / max(seconds, 1e-9),
            }
            last = epoch + 1 == recipe.epochs
            if checkpoint is not None and clock.due(last):
                # Before the test pass: a test image that cannot be read (streamed splits are decoded only now)
                # must not cost the epochs just trained. A finished run resumed from here scores the test set.
                save_checkpoint(checkpoint, run_hash, epoch + 1, model, optimizer, {"history": [*history, record]})
            if test is not None and (last or (recipe.eval_every and (epoch + 1) % recipe.eval_every == 0)):
                record["test_acc"] = evaluate_accuracy(
                    model,
                    test,
                    spec,
                    device,
                    precision=recipe.precision,
                    channels_last=channels_last,
                    workers=recipe.workers,
                )
            history.append(record)
            if dd.is_main():
                tracking.log(desc, record, epoch + 1)
            log.info(
                "%s epoch %d/%d: %s",
                desc,
                epoch + 1,
                recipe.epochs,
                ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"),
            )
    elapsed = time.perf_counter() - t_start
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    test_acc = history[-1].get("test_acc") if history else None
    if test_acc is None and test is not None:
        test_acc = evaluate_accuracy(model, test, spec, device, precision=recipe.precision, workers=recipe.workers)
        if history:
            history[-1]["test_acc"] = test_acc
    return FitResult(
        test_acc=float(test_acc) if test_acc is not None else float("nan"),
        history=history,
        seconds=elapsed,
        images_per_s=seen / max(elapsed, 1e-9) if seen else 0.0,
        resumed_from=start_epoch,
    )
