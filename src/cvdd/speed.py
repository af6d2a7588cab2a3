"""``cvdd bench --suite speed``: each stage's speed and memory, next to a deliberately naive reference.

For every stage (squeeze, recover, relabel, evaluate) the suite runs cvdd and the naive reference of
:mod:`cvdd.naive` (written the way research code of this field usually is) on the same machine, the same real
images and the same models, and prints one Markdown table per stage:

* throughput (images/s, s/image or epochs/s) and the ratio cvdd / naive, with the speed-up (naive time / cvdd
  time);
* peak memory: the resident set (RSS) of the process during that run alone (its high-water mark is reset at each
  boundary with :class:`cvdd.device.PhasePeaks`), and on CUDA the maximum allocated GPU memory;
* the share of the time spent inside the models' forward and backward passes, measured with explicit timers (see
  each table's notes: hooks on the models, :class:`cvdd.benchkit.ModelTimer`, or recover's interleaved
  per-iteration micro-benchmark, :func:`cvdd.benchkit.time_unit`);
* the contention: cores kept busy by other processes while the run went (``/proc/stat``), so that timings from a
  shared machine can be told apart.

Data: a class-balanced slice of a real ImageFolder dataset (the CIFAR-10 tarball by default), copied as files into a
working folder, so that cvdd (which decodes it once into a uint8 cache) and the naive pipeline (which decodes the
files with PIL every epoch) read exactly the same images. The "synthetic" sets of relabel and evaluate are random
real images of that slice at each IPC (the speed of those stages does not depend on the pixels), stored as uint8
for cvdd and as PNG files for the naive pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cvdd.errors import ConfigError
from cvdd.models import create_model

STAGES = ("squeeze", "recover", "relabel", "evaluate")
DEFAULT_EXPERTS = "/tmp/bench-c10-experts"
DATA_ENV = "CVDD_CIFAR10_TAR"
DATA_NAME = "cifar10-jpeg.tar.gz"

# `cvdd bench --suite speed --budget small`: a smoke run of about a minute.
#: Evaluation options the naive reference does not take: overriding them would change cvdd's side only.
NAIVE_FIXED_EVALUATE = frozenset(
    {"optimizer", "cutmix", "label_dtype", "topk", "bssl", "ghost_bn", "compile", "stack_seeds", "label_mode"}
)

SMALL_BUDGET: dict[str, Any] = {
    "train_per_class": 50,
    "squeeze_repeats": 1,
    "recover_ipc": 2,
    "recover_iterations": 10,
    # Ten iterations cannot pay for compiling the experts (the cifar10-cpu preset's `compile: true`).
    "recover_overrides": {"compile": False},
    "recover_reps": 3,
    "recover_warmup": 1,
    "ipcs": [2, 5],
    "epochs": 1,
}


@dataclass
class SpeedConfig:
    """What the speed suite measures; every field can be set with ``cvdd bench --suite speed --set KEY=VALUE``.

    Attributes:
        data: ImageFolder tarball or folder (``train/<class>/``, ``test/`` or ``val/``); empty: ``$CVDD_CIFAR10_TAR``
            or ``../shared/data/cifar10-jpeg.tar.gz``.
        experts: expert folder; ``auto``: ``/tmp/bench-c10-experts`` when it holds experts for this dataset, else
            squeeze the preset's experts for one epoch on the slice (``squeeze``: always do that).
        preset: distill preset giving the squeeze recipe, recover hyper-parameters and evaluation recipe.
        stages: stages to run, in order.
        train_per_class: real training images per class in the slice (squeeze trains one epoch on all of them).
        test_per_class: real test images per class (the student's final test evaluation).
        squeeze_arch: architecture trained in the squeeze stage (empty: the squeeze preset's first).
        squeeze_repeats: cvdd / naive epochs run alternately; the median is reported.
        recover_ipc: IPC recovered by both pipelines.
        recover_committee: committee size N.
        recover_iterations: iterations per image (per unit for cvdd, per IPC index for the naive code).
        recover_init: initialisation of cvdd's recover (``real``, as the naive code; ``patches`` adds the observer's
            scoring to cvdd's time).
        recover_overrides: further recover options for cvdd over ``{bn_groups: ipc}`` (BN statistics per IPC index,
            the naive code's loss, whatever the preset's; ``{ipc_per_block: 1}`` runs one IPC index per batch as the
            naive code does); the suite's own fields (ipc, committee size, iterations, init) take precedence. The
            naive code always runs one index per batch.
        evaluate_overrides: evaluation recipe options over the preset's, for the relabel and evaluate stages of
            both pipelines (``{precision: fp32}`` turns off the GPU's default bf16); the suite's own fields (epochs,
            seeds, label mode, student) take precedence, and options the naive code has fixed
            (:data:`NAIVE_FIXED_EVALUATE`) are refused.
        recover_reps, recover_warmup: iterations of cvdd's per-iteration micro-benchmark (median after warm-up).
        ipcs: IPCs of the relabel and evaluate stages.
        epochs: student epochs (and stored label epochs) per evaluation.
        student: student architecture (empty: the preset's).
        naive_workers: DataLoader workers of the naive pipeline (0: decode in the training process).
        seed: seed of every draw.
        work_dir: working folder (empty: a temporary folder, removed at the end).
    """

    data: str = ""
    experts: str = "auto"
    preset: str = "cifar10-cpu"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    train_per_class: int = 200
    test_per_class: int = 10
    squeeze_arch: str = ""
    squeeze_repeats: int = 3
    recover_ipc: int = 10
    recover_committee: int = 2
    recover_iterations: int = 300
    recover_init: str = "real"
    recover_overrides: dict[str, Any] = field(default_factory=dict)
    evaluate_overrides: dict[str, Any] = field(default_factory=dict)
    recover_reps: int = 10
    recover_warmup: int = 2
    ipcs: list[int] = field(default_factory=lambda: [10, 50])
    epochs: int = 5
    student: str = ""
    naive_workers: int = 0
    seed: int = 0
    work_dir: str = ""

    def validate(self) -> SpeedConfig:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ConfigError(f"unknown speed stage {unknown[0] if unknown else '(none)'}; choose from {STAGES}")
        if min(self.train_per_class, self.test_per_class, self.squeeze_repeats, self.recover_ipc) < 1:
            raise ConfigError("train_per_class, test_per_class, squeeze_repeats and recover_ipc must be >= 1")
        if min(self.recover_committee, self.recover_iterations, self.recover_reps, self.epochs) < 1:
            raise ConfigError("recover_committee, recover_iterations, recover_reps and epochs must be >= 1")
        if not self.ipcs or min(self.ipcs) < 1:
            raise ConfigError("ipcs must list IPCs >= 1")
        sizes = [1]  # images per class the stages run need from the slice
        if "recover" in self.stages:
            sizes.append(self.recover_ipc)
        if {"relabel", "evaluate"} & set(self.stages):
            sizes += self.ipcs
        need = max(sizes)
        if self.train_per_class < need:
            raise ConfigError(f"train_per_class {self.train_per_class} is below the largest IPC asked for ({need})")
        if self.naive_workers < 0 or self.recover_warmup < 0:
            raise ConfigError("naive_workers and recover_warmup must be >= 0")
        one_sided = sorted(set(self.evaluate_overrides) & NAIVE_FIXED_EVALUATE)
        if one_sided:  # the comparison would silently compare two recipes
            raise ConfigError(
                f"evaluate_overrides {', '.join(one_sided)}: the naive reference has these fixed (AdamW, CutMix, "
                "fp16 full logits, a BSSL teacher, no ghost BN or compile), so only cvdd would change"
            )
        return self


def speed_config(overrides: dict[str, Any] | None = None, budget: str = "full") -> SpeedConfig:
    """The suite's configuration: defaults, then the ``small`` budget's (if asked), then ``overrides``."""
    from cvdd.config import apply_overrides

    base = {**(SMALL_BUDGET if budget == "small" else {}), **(overrides or {})}
    return apply_overrides(SpeedConfig(), base, "speed suite").validate()


def default_data() -> str:
    """``$CVDD_CIFAR10_TAR``, else ``../shared/data/cifar10-jpeg.tar.gz`` (from here or the source checkout)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return env
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root.parent / "shared" / "data" / DATA_NAME
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"no data for the speed suite: give --data PATH (an ImageFolder tarball or folder) or {DATA_ENV}")


# --------------------------------------------------------------------------------------------------------------
# Data: the same files for both pipelines
# --------------------------------------------------------------------------------------------------------------


def extract_slice(source: str | os.PathLike[str], dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N train and M test images of every class (sorted names) into ``dest/{train,test}/<class>/``."""
    src = Path(source)
    limits = {"train": train_per_class, "test": test_per_class, "val": test_per_class}
    if src.is_dir():
        for split in ("train", "test", "val"):
            if not (src / split).is_dir() or (split == "val" and (dest / "test").exists()):
                continue
            for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
                files = sorted(p for p in (src / split / cls).iterdir() if p.is_file())[: limits[split]]
                (dest / "test" if split == "val" else dest / split).joinpath(cls).mkdir(parents=True, exist_ok=True)
                for f in files:
                    shutil.copy(f, dest / ("test" if split == "val" else split) / cls / f.name)
    elif tarfile.is_tarfile(src):
        picked: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        with tarfile.open(src) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for m in members:
                parts = m.name.split("/")
                if len(parts) >= 3 and parts[-3] in limits:
                    picked.setdefault((parts[-3], parts[-2]), []).append(m)
            for (split, cls), group in picked.items():
                split_out = "test" if split == "val" else split
                for m in sorted(group, key=lambda m: m.name)[: limits[split]]:
                    target = dest / split_out / cls / m.name.split("/")[-1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    f = tar.extractfile(m)
                    assert f is not None
                    target.write_bytes(f.read())
    else:
        raise ConfigError(f"speed suite data {src} is neither a folder nor a tar archive")
    if not (dest / "train").is_dir() or not (dest / "test").is_dir():
        raise ConfigError(f"{src} has no train/ and test/ (or val/) class folders")
    return dest


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 2) -> str:
    if v is None or v != v:  # None or NaN
        return "n/a"
    return f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _mem(m: dict[str, Any]) -> str:
    start = m.get("start_rss_mib")
    text = f"{m['peak_rss_mib']:,.0f}"
    if start is not None:
        text += f" (+{max(0.0, m['peak_rss_mib'] - start):,.0f})"
    if m.get("gpu_peak_mib") is not None:
        text += f"; GPU {m['gpu_peak_mib']:,.0f}"
    return text


def _other(m: dict[str, Any]) -> str:
    return "n/a" if m.get("other_cores") is None else f"{m['other_cores']:.2f}"


MEM_HEAD = "peak RSS MiB (+ over start)"


@dataclass
class _Ctx:
    cfg: SpeedConfig
    device: torch.device
    work: Path
    emit: Callable[..., None]
    peaks: Any
    data: Any = None
    slice_root: Path | None = None
    experts_dir: Path | None = None
    pool: list[Any] = field(default_factory=list)
    sets: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    summary: list[tuple[str, str, float, float, bool]] = field(default_factory=list)

    def preset(self) -> Any:
        from cvdd.pipeline import get_distill_preset

        return get_distill_preset(self.cfg.preset)

    def eval_config(self) -> Any:
        from cvdd.config import apply_overrides

        over: dict[str, Any] = {
            **self.cfg.evaluate_overrides,
            "epochs": self.cfg.epochs,
            "seeds": [self.cfg.seed],
            "label_mode": "stored",
        }
        if self.cfg.student:
            over["student"] = self.cfg.student
        return apply_overrides(self.preset().evaluate, over, "speed suite evaluate").validate()

    def ratio(self, stage: str, metric: str, cvdd: float, naive: float, higher_is_better: bool) -> str:
        """One summary entry; returns the ratio row's text (cvdd / naive, and the speed-up)."""
        self.summary.append((stage, metric, cvdd, naive, higher_is_better))
        r = cvdd / naive if naive else float("nan")
        speedup = r if higher_is_better else (1 / r if r else float("nan"))
        return f"cvdd / naive {metric}: **{_f(r)}** (speed-up, naive time / cvdd time: **{_f(speedup)}x**)"


# --------------------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------------------


def _setup(ctx: _Ctx) -> None:
    from cvdd.api import load_pool
    from cvdd.data.sources import load_dataset

    cfg = ctx.cfg
    src = cfg.data or default_data()
    t0 = time.perf_counter()
    shutil.rmtree(ctx.work / "slice", ignore_errors=True)  # a reused work_dir gets exactly this slice
    ctx.slice_root = extract_slice(src, ctx.work / "slice", cfg.train_per_class, cfg.test_per_class)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx.data = load_dataset(str(ctx.slice_root), cache_dir=ctx.work / "cache", progress=False)
    t_decode = time.perf_counter() - t0
    ctx.results["decode_s"] = t_decode
    spec = ctx.data.spec
    ctx.emit(
        f"data: {src}: slice of {len(ctx.data.train):,} train / {len(ctx.data.test):,} test images "
        f"({spec.num_classes} classes, {spec.image_size} px), copied as files in {t_extract:.1f} s; cvdd decodes them "
        f"once into a uint8 cache ({t_decode:.1f} s, not counted in its stage times), the naive pipeline reads the "
        "files with PIL every epoch"
    )
    experts = cfg.experts
    if experts == "auto":
        experts = DEFAULT_EXPERTS if _usable_experts(DEFAULT_EXPERTS, spec) else "squeeze"
    if experts == "squeeze":
        import cvdd

        squeeze_name = ctx.preset().squeeze_preset
        t0 = time.perf_counter()
        cvdd.squeeze(
            ctx.data,
            out=ctx.work / "experts",
            preset=squeeze_name,
            epochs=1,
            seed=cfg.seed,
            device=str(ctx.device),
            progress=False,
        )
        ctx.experts_dir = ctx.work / "experts"
        note = f"squeezed for this run (preset {squeeze_name}, 1 epoch on the slice, {time.perf_counter() - t0:.0f} s)"
    else:
        ctx.experts_dir = Path(experts)
        note = "reused"
    ctx.pool = load_pool(str(ctx.experts_dir), device=str(ctx.device))
    for e in ctx.pool:
        spec.check_compatible(e.spec, f"expert {e.name}")
    ctx.emit(f"experts: {ctx.experts_dir} ({', '.join(f'{e.name} {100 * e.test_acc:.1f}%' for e in ctx.pool)}; {note})")


def _usable_experts(folder: str, spec: Any) -> bool:
    from cvdd.api import load_pool
    from cvdd.errors import CvddError

    if not Path(folder).is_dir() or not any(Path(folder).glob("*.json")):
        return False
    try:
        pool = load_pool(folder)
        for e in pool:
            spec.check_compatible(e.spec, f"expert {e.name}")
    except CvddError:
        return False
    return True


def _batch_sizes(n: int, batch: int, micro: int) -> list[int]:
    """Distinct micro-batch sizes of an epoch over ``n`` images (batches of ``batch``, micro-batches of ``micro``)."""
    sizes = set()
    for b0 in range(0, n, batch):
        size = min(batch, n - b0)
        step = micro if 0 < micro < size else size
        sizes.update(min(step, size - m0) for m0 in range(0, size, step))
    return sorted(sizes)


def _warm_up(ctx: _Ctx, arch: str, sizes: list[int], teacher: Any = None) -> None:
    """Untimed forward + backward of ``arch`` (or forward of the ``teacher``) at each batch size.

    Kernels and allocator caches are process-wide and keyed by shape: without this, whichever pipeline ran first
    would pay the warm-up for both.
    """
    spec, dev = ctx.data.spec, ctx.device
    model = None if teacher is not None else create_model(arch, spec.num_classes, spec.image_size).to(dev).train()
    # Both memory layouts: cvdd trains and labels in channels_last, the naive code in the default one.
    cvdd_layout = teacher.channels_last if teacher is not None else True
    for layout in (torch.contiguous_format, torch.channels_last):  # cvdd's last: the teacher is left in it
        if model is not None:
            model.to(memory_format=layout)
        if teacher is not None:
            teacher.channels_last = layout == torch.channels_last and cvdd_layout
        for b in sizes:
            for _ in range(2):
                x = torch.randn(b, 3, spec.image_size, spec.image_size, device=dev).contiguous(memory_format=layout)
                if teacher is not None:
                    teacher(x)
                else:
                    assert model is not None
                    model(x).float().sum().backward()


def _synthetic_set(ctx: _Ctx, ipc: int) -> dict[str, Any]:
    """Random real images of the slice at ``ipc``: uint8 for cvdd, the same pixels as PNG files for the naive code."""
    if ipc not in ctx.sets:
        from cvdd.evaluation.student import random_real_set
        from cvdd.naive import write_png_folder

        u8, labels = random_real_set(ctx.data, ipc, ctx.cfg.seed)
        root = ctx.work / f"png-ipc{ipc}"
        write_png_folder(u8, labels, ctx.data.spec.classes, root)
        ctx.sets[ipc] = {"images": u8, "labels": labels, "png": root}  # uint8, as cvdd holds random real sets
    return ctx.sets[ipc]


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def _stage_squeeze(ctx: _Ctx) -> None:
    from cvdd.benchkit import ModelTimer, measured
    from cvdd.config import apply_overrides, get_squeeze_preset
    from cvdd.device import resolve_precision
    from cvdd.engine import fit
    from cvdd.naive import naive_squeeze_epoch

    cfg, dev, spec = ctx.cfg, ctx.device, ctx.data.spec
    sq = get_squeeze_preset(ctx.preset().squeeze_preset)
    arch = cfg.squeeze_arch or sq.archs[0]
    recipe = apply_overrides(sq.recipe, {"epochs": 1, "warmup_epochs": 0.0}, "speed suite squeeze")
    precision = resolve_precision(recipe.precision, dev)
    assert ctx.slice_root is not None
    _warm_up(ctx, arch, _batch_sizes(len(ctx.data.train), recipe.batch_size, 0))
    runs: dict[str, list[dict[str, Any]]] = {"cvdd": [], "naive": []}
    for r in range(cfg.squeeze_repeats):  # alternate, so that drift on a shared machine affects both alike
        for who in ("cvdd", "naive"):
            torch.manual_seed(cfg.seed)
            model = create_model(arch, spec.num_classes, spec.image_size)
            with ModelTimer([model], dev) as tm, measured(ctx.peaks, f"squeeze-{who}-{r}", dev) as m:
                if who == "cvdd":
                    fit(model, ctx.data.train, None, recipe, spec=spec, device=dev, seed=cfg.seed + r, progress=False)
                    n = len(ctx.data.train)
                else:
                    out = naive_squeeze_epoch(
                        ctx.slice_root / "train",
                        model,
                        recipe,
                        spec.mean,
                        spec.std,
                        spec.image_size,
                        dev,
                        workers=cfg.naive_workers,
                        precision=precision,
                        seed=cfg.seed + r,
                    )
                    n = out["images"]
            runs[who].append({**m, "images": n, "model_s": tm.total_s, "forwards": tm.forwards})
    rows = {}
    for who, rs in runs.items():
        worst = max(rs, key=lambda x: x["peak_rss_mib"])  # memory: the run with the highest peak
        rows[who] = {
            **{k: worst[k] for k in ("peak_rss_mib", "start_rss_mib", "gpu_peak_mib")},
            "images": rs[0]["images"],
            "steps": rs[0]["forwards"],
            "wall_s": statistics.median(x["wall_s"] for x in rs),
            "images_per_s": statistics.median(x["images"] / x["wall_s"] for x in rs),
            "share": statistics.median(x["model_s"] / x["wall_s"] for x in rs),
            "other_cores": None if rs[0]["other_cores"] is None else max(x["other_cores"] for x in rs),
        }
    ctx.results["squeeze"] = rows
    names = {
        "cvdd": "cvdd engine (`fit`, in-memory uint8, batched crop+flip)",
        "naive": "naive ImageFolder + DataLoader (PIL decode, per-image transforms)",
    }
    ctx.emit(
        "",
        f"## squeeze: one training epoch of {arch} over {rows['cvdd']['images']:,} real images",
        "",
        f"| pipeline | images | steps | wall s | images/s | model fwd+bwd share | {MEM_HEAD} | "
        "other processes' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    )
    for who, row in rows.items():
        ctx.emit(
            f"| {names[who]} | {row['images']:,} | {row['steps']} | {_f(row['wall_s'])} | {_f(row['images_per_s'], 0)} "
            f"| {_pct(row['share'])} | {_mem(row)} | {_other(row)} |"
        )
    ctx.emit(
        "",
        ctx.ratio("squeeze", "images/s", rows["cvdd"]["images_per_s"], rows["naive"]["images_per_s"], True),
        "",
        f"Recipe {ctx.preset().squeeze_preset} (batch {recipe.batch_size}, {recipe.optimizer}, random crop with "
        f"padding {recipe.padding} + flip, label smoothing {recipe.label_smoothing}), one epoch, median of "
        f"{cfg.squeeze_repeats} alternating runs. images/s = images / wall time of the whole call (set-up included). "
        f"cvdd's one-time decode of the slice took {ctx.results['decode_s']:.1f} s (not included). Model share: "
        "seconds inside the model's forward and backward (explicit timers installed as hooks on the model: forward "
        "pre-hook to forward hook; gradient of its output to the last parameter gradient) / wall time.",
    )


def _stage_recover(ctx: _Ctx) -> None:
    import importlib

    import cvdd
    from cvdd.benchkit import UnitBench, measured, recover_phases, time_unit
    from cvdd.config import apply_overrides, get_recover_preset
    from cvdd.data.augment import Normalize
    from cvdd.device import derive_seed, resolve_precision
    from cvdd.naive import naive_recover

    rec = importlib.import_module("cvdd.synthesis.recover")
    cfg, dev, spec = ctx.cfg, ctx.device, ctx.data.spec
    name = ctx.preset().recover_preset
    n = min(cfg.recover_committee, len(ctx.pool))
    over = {
        # BN statistics per IPC index: the naive code's loss (one index per batch), here computed for a fused block
        # at once; the preset's `block` statistics would be another objective at the same compute.
        "bn_groups": "ipc",
        **cfg.recover_overrides,
        "ipc": cfg.recover_ipc,
        "committee_size": n,
        "iterations": cfg.recover_iterations,
        "init": cfg.recover_init,
    }
    rcfg = apply_overrides(get_recover_preset(name), over, "speed suite recover").validate(len(ctx.pool))
    assert ctx.experts_dir is not None and ctx.slice_root is not None
    for d in ("recover-cvdd", "recover-naive"):  # a reused work_dir must not let recover resume finished units
        shutil.rmtree(ctx.work / d, ignore_errors=True)
    with recover_phases(dev) as phase, measured(ctx.peaks, "recover-cvdd", dev) as mc:
        result = cvdd.recover(
            str(ctx.experts_dir),
            ctx.work / "recover-cvdd",
            preset=name,
            ipc=cfg.recover_ipc,
            committee_size=n,
            iterations=cfg.recover_iterations,
            init=cfg.recover_init,
            overrides=over,  # the suite's own keys win, exactly as in `rcfg` that the naive code and UnitBench use
            dataset=ctx.data,
            seed=cfg.seed,
            device=str(dev),
            progress=False,
        )
    plan = rec.plan_committees(ctx.pool, rcfg, cfg.seed)
    if plan.committees != result.meta["committees"]:
        raise RuntimeError("the reproduced committee plan differs from the one recover used")

    # cvdd's share inside the experts: recover's iteration reproduced from the public pieces (bench_recover.py).
    models = {e.name: e.model for e in ctx.pool}
    unit = rec.plan_units(spec.num_classes, rcfg)[0]
    n_cls = len(unit.classes)
    x_rows = torch.stack([result.images[c * rcfg.ipc + k] for k in unit.ipc_indices for c in unit.classes])
    x0 = Normalize(spec)(x_rows.to(dev))
    targets = torch.tensor([c for _ in unit.ipc_indices for c in unit.classes], device=dev)
    members = rec.unit_members(plan, unit.ipc_indices, n_cls, dev)
    bench = UnitBench(models, x0, targets, members, n_cls, rcfg, spec, dev, derive_seed(cfg.seed, "speed-recover"))
    it = time_unit(bench, cfg.recover_reps, cfg.recover_warmup)
    iters_run = result.units_run * rcfg.iterations

    with measured(ctx.peaks, "recover-naive", dev) as mn:
        naive = naive_recover(
            ctx.slice_root / "train",
            {e.name: ctx.experts_dir / f"{e.name}.safetensors" for e in ctx.pool},
            plan.committees,
            plan.weights,
            ctx.work / "recover-naive",
            iterations=rcfg.iterations,
            lr=rcfg.lr,
            betas=rcfg.betas,
            r_bn=rcfg.r_bn,
            first_bn_multiplier=rcfg.first_bn_multiplier,
            jitter=spec.jitter if rcfg.jitter is None else rcfg.jitter,
            crop_scale=rcfg.crop_scale,
            size=spec.image_size,
            mean=spec.mean,
            std=spec.std,
            device=dev,
            seed=cfg.seed,
            precision=resolve_precision(rcfg.precision, dev),
        )
    images = len(result.labels)
    c_spi, n_spi = mc["wall_s"] / images, mn["wall_s"] / naive["images"]
    share_it = it["experts_ms"] / it["full_total_ms"]
    share_wall = min(1.0, it["experts_ms"] / 1000 * iters_run / mc["wall_s"])
    n_share = (naive["forward_s"] + naive["backward_s"]) / mn["wall_s"]
    ctx.results["recover"] = {
        "cvdd": {
            **mc,
            **phase,
            "images": images,
            "s_per_image": c_spi,
            "share_iteration": share_it,
            "share_wall": share_wall,
        },
        "naive": {**mn, **naive, "s_per_image": n_spi, "share_wall": n_share},
    }
    # What the steady iterations do not explain is one-time work: compiling the experts (`compile`) and warm-up.
    one_time = phase["optimise"] - iters_run * it["full_total_ms"] / 1000
    compiled = (
        f" cvdd compiles its experts (`compile: true`); about {_f(one_time)} s of its optimise time is one-time "
        f"(optimise s - {iters_run} iterations x (a)): compilation, cached on disk by PyTorch for later runs."
        if rcfg.compile
        else ""
    )
    ctx.results["recover"]["cvdd"]["one_time_s"] = one_time
    committees = sorted({"+".join(c) for c in plan.committees})
    ctx.emit(
        "",
        f"## recover: IPC {rcfg.ipc}, N = {n} ({plan.policy}: {', '.join(committees)}), "
        f"{rcfg.iterations} iterations per image",
        "",
        f"| pipeline | images | wall s | s/image | init s | optimise s | other s | experts fwd+bwd share | "
        f"{MEM_HEAD} | other processes' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| cvdd `recover` ({result.units_run} unit(s) of {len(targets)} images, experts loaded once) | {images} | "
        f"{_f(mc['wall_s'])} | {_f(c_spi, 3)} | {_f(phase['init'])} | {_f(phase['optimise'])} | "
        f"{_f(mc['wall_s'] - phase['init'] - phase['optimise'])} | {_pct(share_it)} of an iteration; "
        f"~{_pct(share_wall)} of the wall | {_mem(mc)} | {_other(mc)} |",
        f"| naive (one IPC index at a time, {naive['reloads']} expert reloads, transforms rebuilt per iteration) | "
        f"{naive['images']} | {_f(mn['wall_s'])} | {_f(n_spi, 3)} | {_f(naive['init_s'])} | "
        f"{_f(naive['optimise_s'])} | {_f(mn['wall_s'] - naive['init_s'] - naive['optimise_s'])} | "
        f"{_pct(n_share)} of the wall | {_mem(mn)} | {_other(mn)} |",
        "",
        ctx.ratio("recover", "s/image", c_spi, n_spi, False),
        "",
        f"Optimisation alone (the iterations): cvdd / naive seconds **{_f(phase['optimise'] / naive['optimise_s'])}**. "
        f"init = initial images (cvdd `{rcfg.init}`; naive: one PIL-decoded real image per class), other = the rest "
        f"of the wall time (cvdd: plan, unit files with checksums, assembly, grid; naive: {naive['reloads']} expert "
        f"reloads, {_f(naive['load_s'])} s, and one PNG file per image).",
        "",
        f"Same experts, committees, voter weights and hyper-parameters (lr {rcfg.lr}, r_bn {rcfg.r_bn}, first BN "
        f"x{rcfg.first_bn_multiplier}); cvdd optimises {rcfg.ipc_per_block} IPC index(es) per batch with BN "
        + (
            "statistics per IPC index (the naive code's loss, which runs one index per batch)"
            if rcfg.bn_groups == "ipc"
            else "statistics over the whole block (not the naive code's per-index loss: same compute, another "
            "objective)"
        )
        + f", compile {str(rcfg.compile).lower()}; cvdd init `{rcfg.init}`, the naive code one random real image "
        f"per class decoded with PIL. cvdd's experts share: its iteration reproduced from the public pieces "
        f"(`cvdd.benchkit.UnitBench`, as bench/bench_recover.py), median of {cfg.recover_reps} after "
        f"{cfg.recover_warmup} warm-up: (a) full iteration {it['full_total_ms']:.1f} ms, (b) experts' forward + "
        f"loss (BN hooks) + backward alone {it['experts_ms']:.1f} ms, measured interleaved; share = (b)/(a); "
        f"'of the wall' = (b) x {iters_run} iterations / wall time (approximate). Naive share: explicit synchronised "
        "timers around the experts' forward + loss and around backward, / wall time." + compiled,
    )


def _labels_on_disk(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _stage_relabel(ctx: _Ctx, quiet: bool = False) -> None:
    from cvdd.benchkit import ModelTimer, measured
    from cvdd.evaluation.student import configure_teacher
    from cvdd.labels.bssl import build_teacher
    from cvdd.labels.stored import relabel_stored
    from cvdd.naive import naive_relabel

    cfg, dev, spec = ctx.cfg, ctx.device, ctx.data.spec
    ecfg = ctx.eval_config()
    rows = []
    for ipc in cfg.ipcs:
        s = _synthetic_set(ctx, ipc)
        teacher = build_teacher(ctx.pool, ecfg)
        configure_teacher(teacher, ecfg, dev)  # as evaluate will: its students accept only these labels
        _warm_up(ctx, "", _batch_sizes(len(s["labels"]), ecfg.batch_size, ecfg.micro_batch), teacher=teacher)
        c_dir, n_dir = ctx.work / f"labels-cvdd-ipc{ipc}", ctx.work / f"labels-naive-ipc{ipc}"
        for d in (c_dir, n_dir):  # a reused work_dir must not let relabel skip finished epochs
            shutil.rmtree(d, ignore_errors=True)
        with (
            ModelTimer([e.model for e in teacher.experts], dev, train_only=False) as tc,
            measured(ctx.peaks, f"relabel-cvdd-{ipc}", dev) as mc,
        ):
            relabel_stored(
                s["images"].to(dev),
                s["labels"].to(dev),
                spec,
                teacher,
                ecfg.label_settings(ecfg.seeds[0]),
                c_dir,
                progress=False,
            )
        tn = ModelTimer(device=dev, train_only=False)
        with tn, measured(ctx.peaks, f"relabel-naive-{ipc}", dev) as mn:
            naive_relabel(
                s["png"],
                [ctx.experts_dir / f"{e.name}.safetensors" for e in teacher.experts],  # type: ignore[operator]
                teacher.weights,
                n_dir,
                epochs=ecfg.epochs,
                batch_size=ecfg.batch_size,
                micro_batch=ecfg.micro_batch,
                size=spec.image_size,
                mean=spec.mean,
                std=spec.std,
                crop_scale=ecfg.crop_scale,
                device=dev,
                seed=cfg.seed,
                workers=cfg.naive_workers,
                timer=tn,
                precision=teacher.precision,  # the same autocast as cvdd's teacher
            )
        for who, m, t, d in (("cvdd", mc, tc, c_dir), ("naive", mn, tn, n_dir)):
            files, nbytes = _labels_on_disk(d)
            rows.append(
                {
                    **m,
                    "ipc": ipc,
                    "who": who,
                    "images": len(s["labels"]),
                    "epochs": ecfg.epochs,
                    "epochs_per_s": ecfg.epochs / m["wall_s"],
                    "files": files,
                    "bytes": nbytes,
                    "share": t.forward_s / m["wall_s"],
                    "forwards": t.forwards,
                }
            )
    ctx.results["relabel"] = rows
    if quiet:
        return
    teacher_names = "+".join(build_teacher(ctx.pool, ecfg).names)
    ctx.emit(
        "",
        f"## relabel: stored soft labels for {ecfg.epochs} student epoch(s) (teacher {teacher_names}, BSSL groups "
        f"of {ecfg.micro_batch}, batch {ecfg.batch_size})",
        "",
        f"| IPC | pipeline | images | wall s | label epochs/s | files written | bytes | teacher forward share | "
        f"{MEM_HEAD} | other processes' cores |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    names = {
        "cvdd": "cvdd `relabel_stored` (one file per epoch)",
        "naive": "naive (PIL-decoded files, one `torch.save` per batch)",
    }
    for r in rows:
        ctx.emit(
            f"| {r['ipc']} | {names[r['who']]} | {r['images']} | {_f(r['wall_s'])} | {_f(r['epochs_per_s'])} | "
            f"{r['files']:,} | {r['bytes']:,} | {_pct(r['share'])} | {_mem(r)} | {_other(r)} |"
        )
    ctx.emit("")
    for ipc in cfg.ipcs:
        c, n = (next(r for r in rows if r["ipc"] == ipc and r["who"] == w) for w in ("cvdd", "naive"))
        ctx.emit(
            f"IPC {ipc}: "
            + ctx.ratio(f"relabel IPC {ipc}", "label epochs/s", c["epochs_per_s"], n["epochs_per_s"], True),
            "",
        )
    ctx.emit(
        "Both write the augmentation plan and fp16 logits of every image of every epoch (files and bytes: what is "
        "on disk afterwards, cvdd's labels.json included); the naive teacher loads its experts itself (included). "
        "Teacher share: seconds inside the teacher experts' forward passes (explicit timers as hooks on each "
        "expert) / wall time."
    )


def _cvdd_evaluate(
    ctx: _Ctx, s: dict[str, Any], ecfg: Any, teacher: Any, label_dir: Path, tag: str
) -> tuple[Any, list[Any], Any, dict[str, Any]]:
    """``evaluate_synthetic`` as it is, with timing hooks on its student and ``fit``'s results (history) kept.

    The module-level names ``create_model`` and ``fit`` of :mod:`cvdd.evaluation.student` are wrapped for the call and
    restored after it (nothing in the package is modified).
    """
    import importlib

    st = importlib.import_module("cvdd.evaluation.student")
    from cvdd.benchkit import ModelTimer, measured

    fits: list[Any] = []
    timer = ModelTimer(device=ctx.device)
    orig_create, orig_fit = st.create_model, st.fit

    def create(*a: Any, **k: Any) -> Any:
        return timer.add(orig_create(*a, **k))

    def fit_and_keep(*a: Any, **k: Any) -> Any:
        res = orig_fit(*a, **k)
        fits.append(res)
        return res

    st.create_model, st.fit = create, fit_and_keep
    try:
        with timer, measured(ctx.peaks, f"evaluate-cvdd-{tag}", ctx.device) as m:
            res = st.evaluate_synthetic(
                s["images"],
                s["labels"],
                ctx.data.spec,
                ctx.data.test,
                ecfg,
                teacher=teacher,
                label_dir=label_dir,
                device=ctx.device,
                progress=False,
            )
    finally:
        st.create_model, st.fit = orig_create, orig_fit
    return res, fits, timer, m


def _stage_evaluate(ctx: _Ctx) -> None:
    from cvdd.benchkit import ModelTimer, measured, optimizer_steps
    from cvdd.device import derive_seed, resolve_precision
    from cvdd.labels.bssl import build_teacher
    from cvdd.naive import naive_evaluate

    cfg, dev, spec = ctx.cfg, ctx.device, ctx.data.spec
    ecfg = ctx.eval_config()
    if "relabel" not in ctx.results:  # the label files both pipelines train on, made untimed
        _stage_relabel(ctx, quiet=True)
    rows = []
    for ipc in cfg.ipcs:
        s = _synthetic_set(ctx, ipc)
        teacher = build_teacher(ctx.pool, ecfg)
        _warm_up(ctx, ecfg.student, _batch_sizes(len(s["labels"]), ecfg.batch_size, ecfg.micro_batch))
        with optimizer_steps() as steps:
            res, fits, tc, mc = _cvdd_evaluate(ctx, s, ecfg, teacher, ctx.work / f"labels-cvdd-ipc{ipc}", f"{ipc}")
        epoch_s = [h["seconds"] for h in fits[0].history]
        c_steps = steps["n"]
        torch.manual_seed(derive_seed(ecfg.seeds[0], "student", ecfg.student))
        student = create_model(ecfg.student, spec.num_classes, spec.image_size)
        with (
            optimizer_steps() as steps,
            ModelTimer([student], dev) as tn,
            measured(ctx.peaks, f"evaluate-naive-{ipc}", dev) as mn,
        ):
            out = naive_evaluate(
                s["png"],
                ctx.work / f"labels-naive-ipc{ipc}",
                student,
                epochs=ecfg.epochs,
                batch_size=ecfg.batch_size,
                micro_batch=ecfg.micro_batch,
                lr=ecfg.lr,
                weight_decay=ecfg.weight_decay,
                temperature=ecfg.temperature,
                size=spec.image_size,
                mean=spec.mean,
                std=spec.std,
                device=dev,
                workers=cfg.naive_workers,
                precision=resolve_precision(ecfg.precision, dev),
            )
        n_steps = steps["n"]
        c_train, n_train = sum(epoch_s), sum(out["epoch_seconds"])
        rows.append(
            {
                **mc,
                "ipc": ipc,
                "who": "cvdd",
                "images_set": len(s["labels"]),
                "epochs": len(epoch_s),
                "steps": c_steps,
                "micro_batches": tc.forwards,
                "images": tc.images,
                "train_s": c_train,
                "epochs_per_s": len(epoch_s) / c_train,
                "share": tc.total_s / c_train,
                "test_acc": res.accs[0],
            }
        )
        rows.append(
            {
                **mn,
                "ipc": ipc,
                "who": "naive",
                "images_set": len(s["labels"]),
                "epochs": len(out["epoch_seconds"]),
                "steps": n_steps,
                "micro_batches": tn.forwards,
                "images": tn.images,
                "train_s": n_train,
                "epochs_per_s": len(out["epoch_seconds"]) / n_train,
                "share": tn.total_s / n_train,
                "files_read": out["files"],
            }
        )
    ctx.results["evaluate"] = rows
    ctx.emit(
        "",
        f"## evaluate: {ecfg.student} student, {ecfg.epochs} epoch(s) on stored soft labels (batch {ecfg.batch_size}, "
        f"micro-batches of {ecfg.micro_batch}, KL at T = {ecfg.temperature:g}, CutMix, random-resized crop + flip)",
        "",
        f"| IPC | pipeline | images | epochs | optimiser steps | micro-batches | training s | epochs/s | student "
        f"fwd+bwd share | {MEM_HEAD} | other processes' cores |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    names = {
        "cvdd": "cvdd `evaluate_synthetic` (stored labels, `SyntheticBatches`)",
        "naive": "naive (PNG ImageFolder + DataLoader, per-batch label files, NumPy CutMix)",
    }
    for r in rows:
        ctx.emit(
            f"| {r['ipc']} | {names[r['who']]} | {r['images_set']} | {r['epochs']} | {r['steps']} | "
            f"{r['micro_batches']} | {_f(r['train_s'])} | {_f(r['epochs_per_s'])} | {_pct(r['share'])} | {_mem(r)} | "
            f"{_other(r)} |"
        )
    ctx.emit("")
    for ipc in cfg.ipcs:
        c, n = (next(r for r in rows if r["ipc"] == ipc and r["who"] == w) for w in ("cvdd", "naive"))
        ctx.emit(
            f"IPC {ipc}: " + ctx.ratio(f"evaluate IPC {ipc}", "epochs/s", c["epochs_per_s"], n["epochs_per_s"], True),
            "",
        )
    ctx.emit(
        "Same images (uint8 for cvdd, the same pixels as PNG files for the naive code), same student and "
        "initialisation, same batch, micro-batches, epochs and loss; optimiser steps are counted with a global "
        "optimiser-step hook and micro-batches by the student's forward hook, so equal counts mean equal work. "
        "training s: cvdd = the sum of `fit`'s per-epoch seconds (the label shard of each epoch is read inside it; "
        "the final test evaluation is not included), naive = its epoch loops (the DataLoader start-up, label file "
        "loads and decoding included). Student share: seconds inside the student's forward and backward (explicit "
        "timers as hooks on the model) / training seconds."
    )


_STAGE_FUNCS: dict[str, Callable[[_Ctx], None]] = {
    "squeeze": _stage_squeeze,
    "recover": _stage_recover,
    "relabel": _stage_relabel,
    "evaluate": _stage_evaluate,
}


# --------------------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SpeedReport:
    """What the suite printed (``lines``, also written to ``path``) and measured (``results``)."""

    lines: list[str]
    results: dict[str, Any]
    path: Path | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@contextlib.contextmanager
def _work_dir(cfg: SpeedConfig) -> Iterator[Path]:
    if cfg.work_dir:
        path = Path(cfg.work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cvdd-speed-") as tmp:
        yield Path(tmp)


def run_speed_suite(
    cfg: SpeedConfig | None = None,
    *,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    command: str | None = None,
    echo: bool = True,
) -> SpeedReport:
    """Run the speed suite: one Markdown table per stage, cvdd next to the naive reference, and a summary.

    Args:
        cfg: what to measure (default :class:`SpeedConfig`).
        device: where to run (default: ``CVDD_DEVICE`` or CUDA when available, else the CPU).
        out: also write the tables to this Markdown file (rewritten after every stage).
        command: the command line to print at the top.
        echo: print each line as it is produced.

    Returns:
        A :class:`SpeedReport`.
    """
    from cvdd import __version__
    from cvdd.benchkit import machine_line
    from cvdd.config import to_dict
    from cvdd.device import PhasePeaks, resolve_device

    cfg = (cfg or SpeedConfig()).validate()
    dev = resolve_device(device)
    lines: list[str] = []
    path = Path(out) if out is not None else None

    def emit(*rows: str) -> None:
        for row in rows:
            lines.append(row)
            if echo:
                print(row, flush=True)

    def save() -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")

    t_start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit("# cvdd speed suite: cvdd against a deliberately naive reference", "")
    if command:
        emit(f"command: `{command}`")
    emit(
        machine_line(dev) + f"; cvdd {__version__}",
        f"config: {json.dumps(to_dict(cfg), sort_keys=True)}",
    )
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(_work_dir(cfg))
        ctx = _Ctx(cfg, dev, work, emit, PhasePeaks(dev))
        _setup(ctx)
        emit(
            f"preset: {cfg.preset}; memory: peak RSS of the process during each run alone (high-water mark reset at "
            f"each boundary: {'yes' if ctx.peaks.per_phase else 'no, process peak so far'})"
            + ("; GPU: max allocated" if dev.type == "cuda" else "")
            + (
                f"; the naive pipeline's {cfg.naive_workers} DataLoader worker processes are not in its RSS"
                if cfg.naive_workers
                else "; the naive pipeline decodes in the measured process (naive_workers=0)"
            )
        )
        save()
        for stage in [s for s in STAGES if s in cfg.stages]:  # evaluate trains on relabel's files
            _STAGE_FUNCS[stage](ctx)
            save()
        wall = time.perf_counter() - t_start
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        emit(
            "",
            "## summary: cvdd / naive on the same machine and data",
            "",
            "| stage | metric | cvdd | naive | cvdd / naive | speed-up (naive time / cvdd time) |",
            "|---|---|---:|---:|---:|---:|",
        )
        for stage, metric, c, n, higher in ctx.summary:
            r = c / n if n else float("nan")
            speedup = r if higher else (1 / r if r else float("nan"))
            digits = 3 if metric == "s/image" else 2
            emit(f"| {stage} | {metric} | {_f(c, digits)} | {_f(n, digits)} | {_f(r)} | {_f(speedup)}x |")
        emit("", f"Wall time of the suite: {wall:.0f} s; load average {load0:.2f} → {load1:.2f}.")
        save()
        results = dict(ctx.results)
        results["summary"] = [
            {"stage": s, "metric": m, "cvdd": c, "naive": n, "ratio": c / n if n else float("nan")}
            for s, m, c, n, _ in ctx.summary
        ]
    return SpeedReport(lines, results, path)
