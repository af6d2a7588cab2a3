"""Student training on a synthetic set, under one frozen recipe for every method (evaluation.md).

The synthetic set (a few hundred images) and its labels live on the device for the whole run; every epoch
follows an :class:`~cvdd.labels.plans.EpochPlan` (random-resized crop, flip, CutMix), drawn online from the
seed or replayed from stored label shards. Loss: KL(softmax(z_t / T) || softmax(z_s / T)) with batchmean
reduction and no T² factor (as the method), or cross-entropy with ``label_mode="hard"``. The accuracy
reported is the top-1 on the real test split after the final epoch, never the best over epochs.
"""

from __future__ import annotations

import collections
import json
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvdd import distributed as dd
from cvdd.artifacts import pixel_digest
from cvdd.config import Recipe, identity_dict
from cvdd.data.augment import Normalize
from cvdd.data.sources import FileSplit, RealDataset, TensorSplit
from cvdd.data.specs import DatasetSpec
from cvdd.device import derive_seed, resolve_device, resolve_precision
from cvdd.engine import fit
from cvdd.engine.loop import Batch, Objective, hard_label_loss
from cvdd.errors import ConfigError
from cvdd.labels.bssl import Teacher
from cvdd.labels.plans import apply_plan, make_plan
from cvdd.labels.stored import LabelSettings, load_shard
from cvdd.models import create_model, model_info

log = logging.getLogger(__name__)

LABEL_MODES = ("online", "stored", "hard")


@dataclass
class EvalConfig:
    """The frozen evaluation recipe.

    Attributes:
        student: student architecture.
        epochs: training epochs over the synthetic set.
        batch_size: images per optimiser step.
        micro_batch: images per micro-batch (the student's and the BSSL teacher's BN group; 0 = whole batch).
        optimizer: ``adamw`` (method) or ``sgd``/``adam``.
        lr: base learning rate.
        weight_decay: decoupled weight decay (not applied to BN parameters and biases).
        cosine_eta: smoothed cosine factor (1 = cosine to 0; 2 ends at half the LR).
        temperature: KL temperature T.
        cutmix: CutMix per batch.
        crop_scale: scale range of the per-image random-resized crop.
        label_mode: ``online`` (teacher inside training), ``stored`` (per-epoch shards) or ``hard``.
        teacher: ``committee`` (every expert, weights softmax(prior / teacher_temperature)) or an expert name.
        teacher_temperature: T of the relabel committee weights (10 in the method).
        bssl: teacher BN uses the statistics of each micro-batch (Batch-Specific Soft Labelling).
        seeds: student seeds; the report is mean ± std over them.
        label_dtype: ``fp16`` or ``fp32`` logits in stored mode.
        topk: keep only the top-k logits in stored mode (0 = all).
        precision: ``auto``, ``fp32`` or ``bf16`` for the student's forward.
        channels_last: the student's memory format (None: channels_last, on every device).
        compile: train the student through ``torch.compile`` (see :class:`cvdd.config.Recipe`).
        ghost_bn: one forward per step with per-micro-batch BN statistics (see :class:`cvdd.config.Recipe`).
        stack_seeds: train every seed's student at once as one vectorised model (:mod:`cvdd.engine.stacked`):
            the same students up to rounding, with a fraction of the kernel launches (for GPUs; one process, not
            with ``compile``).
        checkpoint_every_s: with a checkpoint folder, write a student's resume checkpoint at most this often
            (seconds; 0: after every epoch; see :class:`cvdd.config.Recipe`). Not part of the identity.
    """

    student: str = "resnet18"
    epochs: int = 300
    batch_size: int = 16
    micro_batch: int = 8
    optimizer: str = "adamw"
    lr: float = 0.001
    weight_decay: float = 0.01
    cosine_eta: float = 1.0
    temperature: float = 20.0
    cutmix: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    label_mode: str = "online"
    teacher: str = "committee"
    teacher_temperature: float = 10.0
    bssl: bool = True
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    label_dtype: str = "fp16"
    topk: int = 0
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    ghost_bn: bool = False
    stack_seeds: bool = False
    checkpoint_every_s: float = 60.0

    def identity(self) -> dict[str, Any]:
        """The fields that define an evaluation (result caches); switches added later count only when set."""
        out = identity_dict(self, {"compile": False, "channels_last": None, "ghost_bn": False, "stack_seeds": False})
        out.pop("checkpoint_every_s")  # when to write a checkpoint never changes a student
        return out

    def validate(self) -> EvalConfig:
        model_info(self.student)  # an unknown student fails here, not after a squeeze (one-line ModelError)
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"unknown label mode {self.label_mode!r}; choose one of {', '.join(LABEL_MODES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch < 0:
            raise ConfigError("epochs and batch_size must be >= 1 and micro_batch >= 0")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")
        if self.label_dtype not in ("fp16", "fp32"):
            raise ConfigError(f"unknown label dtype {self.label_dtype!r}; choose fp16 or fp32")
        if self.stack_seeds and self.compile:
            raise ConfigError("stack_seeds and compile cannot be combined; choose one")
        self.recipe()  # the training fields too (checkpoint_every_s...), before any work rather than at training
        return self

    def recipe(self) -> Recipe:
        return Recipe(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            lr=self.lr,
            weight_decay=self.weight_decay,
            no_decay_bn_bias=True,
            schedule="cosine",
            cosine_eta=self.cosine_eta,
            augment="none",
            micro_batch=self.micro_batch,
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
            ghost_bn=self.ghost_bn,
            checkpoint_every_s=self.checkpoint_every_s,
        ).validate()

    def label_settings(self, seed: int) -> LabelSettings:
        return LabelSettings(
            self.epochs,
            self.batch_size,
            self.micro_batch,
            seed,
            self.crop_scale,
            self.cutmix,
            self.label_dtype,
            self.topk,
        )


class SyntheticBatches:
    """Batches of a synthetic set on the device, following per-epoch plans (online) or stored shards."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: DatasetSpec,
        cfg: EvalConfig,
        device: torch.device,
        label_dir: str | Path | None = None,
        label_seed: int = 0,
    ) -> None:
        self.images = images.to(device) if images.dtype == torch.uint8 else images.to(device).float()
        self.labels = labels.to(device).long()
        self.spec = spec
        self.cfg = cfg
        self.device = device
        self.normalize = Normalize(spec)
        self.label_dir = label_dir
        self.settings = cfg.label_settings(label_seed)
        self.num_samples = len(self.labels)
        self.steps_per_epoch = -(-self.num_samples // cfg.batch_size)
        # Stored shards fix every epoch's plan: the generator is not used, so students of several seeds can share
        # one draw of the batches (cvdd.engine.stacked).
        self.seed_independent = label_dir is not None

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        logits = None
        if self.label_dir is not None:
            plan, logits = load_shard(self.label_dir, epoch, self.settings, self.spec.num_classes, self.device)
        else:
            plan = make_plan(
                self.num_samples,
                self.cfg.batch_size,
                self.spec.image_size,
                generator,
                self.cfg.crop_scale,
                self.cfg.cutmix,
            )
        for step in range(plan.num_batches):
            x, y, y2, lam = apply_plan(self.images, self.labels, plan, step, self.normalize)
            soft = None if logits is None else logits[step * plan.batch_size : step * plan.batch_size + len(y)]
            yield Batch(x, y, soft, y2 if self.cfg.cutmix else None, lam if self.cfg.cutmix else None)


def kd_loss(temperature: float, teacher: Teacher | None) -> Objective:
    """KL(softmax(z_t / T) || softmax(z_s / T)), batchmean; z_t stored in the batch or from the online teacher.

    With stored logits in the batch the loss is a mean over rows, given by ``per_row`` (``rowwise_key`` names it,
    ``needs_soft`` says it holds only then; see :func:`cvdd.engine.loop.hard_label_loss`). An online teacher labels
    each micro-batch with its BN statistics (BSSL), which couples the rows, so that case is never batched further.
    """

    def kl(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
        log_p, q = torch.log_softmax(logits / temperature, dim=1), torch.softmax(target / temperature, dim=1)
        return nn.functional.kl_div(log_p, q, reduction=reduction)

    def objective(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch.soft
        if target is None:
            if teacher is None:
                raise ConfigError("soft labels need a teacher or stored label shards")
            target = teacher(batch.inputs)
        return kl(logits, target, "batchmean")

    def per_row(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        assert batch.soft is not None, "per-row KD needs stored soft labels"
        return kl(logits, batch.soft, "none").sum(1)

    objective.per_row = per_row  # type: ignore[attr-defined]
    objective.rowwise_key = ("kd", temperature)  # type: ignore[attr-defined]
    objective.needs_soft = True  # type: ignore[attr-defined]
    return objective


@dataclass
class EvalResult:
    """Students' real test top-1 (fractions) over seeds, with cost.

    Attributes:
        accs: final-epoch top-1 of each seed.
        seeds: the seeds, aligned with ``accs``.
        seconds: wall time of all student runs (relabelling excluded: see ``label_seconds``).
        label_bytes: bytes of stored soft labels (0 online or hard).
        label_seconds: wall time of relabelling (stored mode).
        images_per_s: student training throughput (median over seeds).
    """

    accs: list[float]
    seeds: list[int]
    seconds: float
    label_bytes: int = 0
    label_seconds: float = 0.0
    images_per_s: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.stdev(self.accs) if len(self.accs) > 1 else 0.0


def evaluate_synthetic(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: DatasetSpec,
    test: TensorSplit | FileSplit,
    cfg: EvalConfig,
    *,
    teacher: Teacher | None = None,
    label_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> EvalResult:
    """Train one student per seed on a synthetic set and measure real test top-1 after the final epoch.

    Args:
        images: (N, 3, S, S) float32 in [0, 1], or uint8 (held as uint8 on the device).
        labels: (N,) int64.
        spec: dataset spec.
        test: the real test split.
        cfg: the evaluation recipe.
        teacher: soft-label teacher (online and stored modes).
        label_dir: folder for stored label shards (stored mode; created by relabel if missing).
        device: where to train.
        progress: progress bars.
        checkpoint_dir: keep a resume checkpoint of each seed's student here (written as
            ``cfg.checkpoint_every_s`` says), so a killed evaluation resumes from its last written epoch (a
            checkpoint made from other pixels, labels or recipe is ignored); None trains without checkpoints.
    """
    job = EvalJob(images, labels, cfg, teacher=teacher, label_dir=label_dir, checkpoint_dir=checkpoint_dir)
    return evaluate_many([job], spec, test, device=device, progress=progress)[0]


@dataclass
class EvalJob:
    """One synthetic set to evaluate: the arguments of :func:`evaluate_synthetic` that belong to the set.

    Attributes:
        images: (N, 3, S, S) float32 in [0, 1], or uint8 (held as uint8 on the device).
        labels: (N,) int64.
        cfg: the evaluation recipe.
        teacher: soft-label teacher (online and stored modes).
        label_dir: folder for stored label shards (stored mode).
        checkpoint_dir: where the set's student resume checkpoints live (None: no checkpoints).
        restart_labels: discard stored labels in ``label_dir`` made for another set, teacher or settings (default:
            refuse them).
    """

    images: torch.Tensor
    labels: torch.Tensor
    cfg: EvalConfig
    teacher: Teacher | None = None
    label_dir: str | Path | None = None
    checkpoint_dir: str | Path | None = None
    restart_labels: bool = False


@dataclass
class _Prepared:
    """A job made ready to train: its source of batches, loss, checkpoint identity and relabelling cost."""

    job: EvalJob
    source: SyntheticBatches
    objective: Objective
    identity: dict[str, Any]
    label_info: dict[str, Any]


def _prepare(
    job: EvalJob, spec: DatasetSpec, dev: torch.device, progress: bool, on_device: dict[int, torch.Tensor]
) -> _Prepared:
    """Relabel (stored mode) and build the job's batch source; ``on_device`` caches each set's device copy by the
    ``id`` of its images, so jobs of one set (soft and hard labels) share one copy."""
    cfg, teacher = job.cfg.validate(), job.teacher
    if id(job.images) not in on_device:
        # A uint8 set stays uint8 on the device (a quarter of float32: 7.5 GB, not 30 GB, at ImageNet-1K IPC 50);
        # each batch's rows become floats when it is cut (apply_plan), the very floats of a float32 copy.
        imgs = job.images if job.images.dtype == torch.uint8 else job.images.float()
        on_device[id(job.images)] = imgs.to(dev)
    imgs = on_device[id(job.images)]
    if cfg.label_mode != "hard" and teacher is None:
        raise ConfigError(f"label mode {cfg.label_mode!r} needs a teacher")
    configure_teacher(teacher, cfg, dev)
    label_info: dict[str, Any] = {}
    if cfg.label_mode == "stored":
        from cvdd.labels.stored import relabel_stored

        if job.label_dir is None:  # a caller's omission, said in one line rather than as an assert
            raise ConfigError("label mode 'stored' needs a folder for the label shards (label_dir)")
        assert teacher is not None
        label_info = relabel_stored(
            imgs,
            job.labels.to(dev),
            spec,
            teacher,
            cfg.label_settings(cfg.seeds[0]),
            job.label_dir,
            progress=progress,
            restart=job.restart_labels,
        )
    objective = hard_label_loss() if cfg.label_mode == "hard" else kd_loss(cfg.temperature, teacher)
    digest = pixel_digest(imgs, job.labels)
    # What a student checkpoint must match to be resumed: the set, the teacher and every evaluation field that
    # shapes training (temperature, crops, CutMix, label mode...); seeds are matched per run, switches as the recipe.
    evaluation = {k: v for k, v in cfg.identity().items() if k not in ("seeds", "stack_seeds")}
    identity = {
        "data": digest[:16],
        "student": cfg.student,
        "teacher": teacher.describe() if teacher is not None else None,
        "classes": list(spec.classes),
        "evaluation": evaluation,
    }
    # Stored labels were made for the first seed's plans, which every seed's student then replays.
    stored = job.label_dir if cfg.label_mode == "stored" else None
    source = SyntheticBatches(imgs, job.labels, spec, cfg, dev, label_dir=stored, label_seed=cfg.seeds[0])
    return _Prepared(job, source, objective, identity, label_info)


def configure_teacher(teacher: Teacher | None, cfg: EvalConfig, dev: torch.device) -> None:
    """Set the teacher's BN groups (the student's micro-batch), BSSL and precision (the student's) for ``cfg``.

    The one place that does so: labels stored by ``cvdd relabel`` (or the speed suite) and the labels a student
    then asks for must describe the same teacher, or the student refuses them. Called again right before a job's
    students train: jobs may share one teacher object with other settings.
    """
    if teacher is not None:
        teacher.group_size = cfg.micro_batch
        teacher.bssl = cfg.bssl
        teacher.precision = resolve_precision(cfg.precision, dev)  # fp32 on CPU by default
        teacher.channels_last = cfg.channels_last is not False  # the student's layout (default channels_last)


def _student(cfg: EvalConfig, spec: DatasetSpec, seed: int) -> nn.Module:
    torch.manual_seed(derive_seed(seed, "student", cfg.student))
    return create_model(cfg.student, spec.num_classes, spec.image_size)


def evaluate_many(
    jobs: list[EvalJob],
    spec: DatasetSpec,
    test: TensorSplit | FileSplit,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[EvalResult]:
    """Evaluate several synthetic sets; with ``stack_seeds``, all their students train as one stacked model.

    Jobs whose recipe sets ``stack_seeds`` and agrees in everything that shapes a training step (student, recipe,
    set size) train together: every seed of every such job is one member of one
    :func:`~cvdd.engine.stacked.fit_stacked` run, each member with its own set, labels, loss and seed, so each
    student is the one its job alone would train (up to rounding). On a GPU, where a small student's step is bound
    by kernel launches, that is the point: the pipeline's soft- and hard-label students of every method at one IPC
    become one run. Other jobs train one student per seed after the other, as :func:`evaluate_synthetic`.

    Args:
        jobs: the sets and their recipes.
        spec: dataset spec.
        test: the real test split.
        device: where to train.
        progress: progress bars.

    Returns:
        One :class:`EvalResult` per job, in order. Jobs trained together share the group's wall time in
        proportion to their number of students (``seconds``; the sum over jobs is the wall time).
    """
    dev = resolve_device(device)
    cfg_ok = [job.cfg.validate() for job in jobs]
    results: list[EvalResult | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for i, (job, cfg) in enumerate(zip(jobs, cfg_ok)):
        if cfg.stack_seeds and dd.world() == 1:
            # An online teacher labels during training with the job's BSSL setting: only equal ones share a stack.
            bssl = cfg.bssl if cfg.label_mode == "online" else None
            key = json.dumps([cfg.student, cfg.recipe().identity(), len(job.labels), bssl], sort_keys=True)
            groups.setdefault(key, []).append(i)
    # Each set lives on the device only while a job that trains on it is being prepared or trained: jobs are
    # prepared right before they train (one by one, or a stack's together), and a set's device copy is dropped
    # after its last job (a large set is not held several times over, as it was not before stacking existed).
    uses = collections.Counter(id(job.images) for job in jobs)
    on_device: dict[int, torch.Tensor] = {}

    def done(i: int) -> None:
        uses[id(jobs[i].images)] -= 1
        if uses[id(jobs[i].images)] == 0:
            on_device.pop(id(jobs[i].images), None)

    for members in groups.values():
        if sum(len(jobs[i].cfg.seeds) for i in members) < 2:
            continue  # a single student: nothing to stack
        ready = [_prepare(jobs[i], spec, dev, progress, on_device) for i in members]
        for i, res in zip(members, _train_stacked(ready, spec, test, dev, progress)):
            results[i] = res
            done(i)
        del ready
    for i, job in enumerate(jobs):
        if results[i] is None:
            results[i] = _train_one_by_one(_prepare(job, spec, dev, progress, on_device), spec, test, dev, progress)
            done(i)
    return [r for r in results if r is not None]


def _result(p: _Prepared, accs: list[float], seconds: float, rates: list[float]) -> EvalResult:
    info = p.label_info
    label_bytes, label_s = int(info.get("bytes", 0)), float(info.get("seconds", 0.0))
    return EvalResult(accs, list(p.job.cfg.seeds), seconds, label_bytes, label_s, statistics.median(rates))


def _train_one_by_one(
    p: _Prepared, spec: DatasetSpec, test: TensorSplit | FileSplit, dev: torch.device, progress: bool
) -> EvalResult:
    cfg, ckpt = p.job.cfg, p.job.checkpoint_dir
    configure_teacher(p.job.teacher, cfg, dev)
    t0 = time.perf_counter()
    accs, rates = [], []
    for seed in cfg.seeds:
        res = fit(
            _student(cfg, spec, seed),
            p.source,
            test,
            cfg.recipe(),
            spec=spec,
            device=dev,
            seed=seed,
            objective=p.objective,
            progress=progress,
            desc=f"student {cfg.student} seed {seed}",
            checkpoint=None if ckpt is None else Path(ckpt) / f"student-seed{seed}.pt",
            identity=p.identity,
        )
        accs.append(res.test_acc)
        rates.append(res.images_per_s)
    return _result(p, accs, time.perf_counter() - t0, rates)


def _train_stacked(
    group: list[_Prepared], spec: DatasetSpec, test: TensorSplit | FileSplit, dev: torch.device, progress: bool
) -> list[EvalResult]:
    import hashlib

    from cvdd.engine.stacked import fit_stacked

    models, sources, seeds, objectives = [], [], [], []
    for p in group:
        configure_teacher(p.job.teacher, p.job.cfg, dev)  # equal settings within a group (its key)
        for seed in p.job.cfg.seeds:
            models.append(_student(p.job.cfg, spec, seed))
            sources.append(p.source)  # shared by the job's seeds only where its batches are seed-independent
            seeds.append(seed)
            objectives.append(p.objective)
    identity = {"jobs": [p.identity for p in group]}
    tag = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    ckpt_dir = group[0].job.checkpoint_dir
    cfg = group[0].job.cfg
    t0 = time.perf_counter()
    fits = fit_stacked(
        models,
        sources,
        test,
        cfg.recipe(),
        spec=spec,
        device=dev,
        seeds=seeds,
        objective=objectives,
        progress=progress,
        desc=f"{len(models)} stacked {cfg.student} students",
        checkpoint=None if ckpt_dir is None else str(Path(ckpt_dir) / f"stacked-{tag}.pt"),
        identity=identity,
    )
    wall = time.perf_counter() - t0
    out, at = [], 0
    for p in group:
        n = len(p.job.cfg.seeds)
        mine = fits[at : at + n]
        at += n
        out.append(_result(p, [r.test_acc for r in mine], wall * n / len(models), [r.images_per_s for r in mine]))
    return out


def random_real_set(data: RealDataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPC random real training images per class (seeded), class-major: uint8 (C * IPC, 3, S, S), int64 labels.

    uint8 as the real images are (:func:`cvdd.data.augment.unit_float` gives their [0, 1] floats): a float32 copy
    would be 4x larger (30 GB at ImageNet-1K IPC 50).

    The draw is the one recover's ``init: real`` makes with the same seed, so a set recovered from real images
    and this baseline start from the very same pixels (a paired comparison).
    """
    from cvdd.synthesis.init import real_init

    if ipc < 1:
        raise ConfigError(f"ipc must be at least 1 (got {ipc})")
    imgs = [real_init(data, c, ipc, seed) for c in range(data.spec.num_classes)]
    images = torch.cat(imgs)
    labels = torch.arange(data.spec.num_classes).repeat_interleave(ipc)
    return images, labels
