"""Student training on a synthetic set, under one frozen recipe for every method (evaluation.md).

The synthetic set (a few hundred images) and its labels live on the device for the whole run; every epoch
follows an :class:`~cvdd.relabel.plans.EpochPlan` (random-resized crop, flip, CutMix), drawn online from the
seed or replayed from stored label shards. Loss: KL(softmax(z_t / T) || softmax(z_s / T)) with batchmean
reduction and no T² factor (as the method), or cross-entropy with ``label_mode="hard"``. The accuracy
reported is the top-1 on the real test split after the final epoch, never the best over epochs.
"""

from __future__ import annotations

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
from cvdd.config import Recipe, identity_dict
from cvdd.data.augment import Normalize
from cvdd.data.sources import FileSplit, RealDataset, TensorSplit
from cvdd.data.specs import DatasetSpec
from cvdd.device import derive_seed, resolve_device, resolve_precision
from cvdd.engine import fit
from cvdd.engine.fit import Batch, Objective, hard_label_loss
from cvdd.errors import ConfigError
from cvdd.models import create_model
from cvdd.relabel.bssl import Teacher
from cvdd.relabel.plans import apply_plan, make_plan
from cvdd.relabel.stored import LabelSettings, load_shard

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

    def identity(self) -> dict[str, Any]:
        """The fields that define an evaluation (result caches); switches added later count only when set."""
        return identity_dict(self, {"compile": False, "channels_last": None, "ghost_bn": False, "stack_seeds": False})

    def validate(self) -> EvalConfig:
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
        self.images = images.to(device).float()
        self.labels = labels.to(device).long()
        self.spec = spec
        self.cfg = cfg
        self.device = device
        self.normalize = Normalize(spec)
        self.label_dir = label_dir
        self.settings = cfg.label_settings(label_seed)
        self.num_samples = len(self.labels)
        self.steps_per_epoch = -(-self.num_samples // cfg.batch_size)

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
    """KL(softmax(z_t / T) || softmax(z_s / T)), batchmean; z_t stored in the batch or from the online teacher."""

    def objective(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        target = batch.soft
        if target is None:
            if teacher is None:
                raise ConfigError("soft labels need a teacher or stored label shards")
            target = teacher(batch.inputs)
        return nn.functional.kl_div(
            torch.log_softmax(logits / temperature, dim=1),
            torch.softmax(target / temperature, dim=1),
            reduction="batchmean",
        )

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
        images: (N, 3, S, S) float32 in [0, 1] (or uint8).
        labels: (N,) int64.
        spec: dataset spec.
        test: the real test split.
        cfg: the evaluation recipe.
        teacher: soft-label teacher (online and stored modes).
        label_dir: folder for stored label shards (stored mode; created by relabel if missing).
        device: where to train.
        progress: progress bars.
        checkpoint_dir: keep a per-epoch checkpoint of each seed's student here, so a killed evaluation
            resumes at its last finished epoch (a checkpoint made from other pixels, labels or recipe is
            ignored); None trains without checkpoints.
    """
    import hashlib

    cfg.validate()
    dev = resolve_device(device)
    imgs = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if cfg.label_mode != "hard" and teacher is None:
        raise ConfigError(f"label mode {cfg.label_mode!r} needs a teacher")
    if teacher is not None:
        teacher.group_size = cfg.micro_batch
        teacher.bssl = cfg.bssl
        teacher.precision = resolve_precision(cfg.precision, dev)  # the student's precision (fp32 on CPU by default)
    label_info: dict[str, Any] = {}
    if cfg.label_mode == "stored":
        from cvdd.relabel.stored import relabel_stored

        assert teacher is not None and label_dir is not None
        label_info = relabel_stored(
            imgs.to(dev), labels.to(dev), spec, teacher, cfg.label_settings(cfg.seeds[0]), label_dir, progress=progress
        )
    objective = hard_label_loss() if cfg.label_mode == "hard" else kd_loss(cfg.temperature, teacher)
    accs, rates = [], []
    t0 = time.perf_counter()
    digest = hashlib.sha256(imgs.cpu().contiguous().numpy().tobytes())
    digest.update(labels.cpu().contiguous().numpy().tobytes())
    identity = {
        "data": digest.hexdigest()[:16],
        "student": cfg.student,
        "teacher": teacher.describe() if teacher is not None else None,
        "classes": list(spec.classes),
    }

    # Stored labels were made for the first seed's plans, which every seed's student then replays.
    stored = label_dir if cfg.label_mode == "stored" else None
    source = SyntheticBatches(imgs, labels, spec, cfg, dev, label_dir=stored, label_seed=cfg.seeds[0])

    def student(seed: int) -> nn.Module:
        torch.manual_seed(derive_seed(seed, "student", cfg.student))
        return create_model(cfg.student, spec.num_classes, spec.image_size)

    if cfg.stack_seeds and len(cfg.seeds) > 1 and dd.world() == 1:
        from cvdd.engine.stacked import fit_stacked

        # A list of sources: each student draws its own seed's plans (online); one source: they share its batches.
        results = fit_stacked(
            [student(s) for s in cfg.seeds],
            source if stored is not None else [source] * len(cfg.seeds),
            test,
            cfg.recipe(),
            spec=spec,
            device=dev,
            seeds=cfg.seeds,
            objective=objective,
            progress=progress,
            desc=f"students {cfg.student} seeds {','.join(map(str, cfg.seeds))}",
            checkpoint=None
            if checkpoint_dir is None
            else str(Path(checkpoint_dir) / f"students-seeds{'-'.join(map(str, cfg.seeds))}.pt"),
            identity=identity,
        )
        accs = [r.test_acc for r in results]
        rates = [r.images_per_s for r in results]
    else:
        for seed in cfg.seeds:
            res = fit(
                student(seed),
                source,
                test,
                cfg.recipe(),
                spec=spec,
                device=dev,
                seed=seed,
                objective=objective,
                progress=progress,
                desc=f"student {cfg.student} seed {seed}",
                checkpoint=None if checkpoint_dir is None else Path(checkpoint_dir) / f"student-seed{seed}.pt",
                identity=identity,
            )
            accs.append(res.test_acc)
            rates.append(res.images_per_s)
    return EvalResult(
        accs,
        list(cfg.seeds),
        time.perf_counter() - t0,
        int(label_info.get("bytes", 0)),
        float(label_info.get("seconds", 0.0)),
        statistics.median(rates),
    )


def random_real_set(data: RealDataset, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPC random real training images per class (seeded), class-major: float32 (C * IPC, 3, S, S), labels.

    The draw is the one recover's ``init: real`` makes with the same seed, so a set recovered from real images
    and this baseline start from the very same pixels (a paired comparison).
    """
    from cvdd.synthesis.init import real_init

    if ipc < 1:
        raise ConfigError(f"ipc must be at least 1 (got {ipc})")
    imgs = [real_init(data, c, ipc, seed) for c in range(data.spec.num_classes)]
    images = torch.cat(imgs).float() / 255
    labels = torch.arange(data.spec.num_classes).repeat_interleave(ipc)
    return images, labels
