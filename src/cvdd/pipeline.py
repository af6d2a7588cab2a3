"""``cvdd distill``: squeeze (or reuse experts) -> recover -> relabel -> evaluate, with honest baselines.

Every method is evaluated under the identical recipe and teacher. Each row of ``results.json`` carries the
accuracy over seeds, the gain over random real images (IOR = acc(method) - acc(random real), same IPC, same
labels) and the hard-label gap (HLR = acc(full real data, hard labels) - acc(method, hard labels)), with the
wall time of each stage. ``results.md`` is the same as a table; the ordering is reported as measured.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvdd import __version__
from cvdd import distributed as dd
from cvdd.artifacts import atomic_write_text, build_stamp, describe_build, other_builds
from cvdd.config import (
    Recipe,
    _load_yaml,
    apply_overrides,
    from_dict,
    get_recover_preset,
    get_squeeze_preset,
    refuse_owned,
    to_dict,
)
from cvdd.data.sources import RealDataset
from cvdd.device import PhasePeaks
from cvdd.errors import ConfigError
from cvdd.evaluation.student import EvalConfig, EvalJob, EvalResult, evaluate_many, random_real_set
from cvdd.experts import pool_priors
from cvdd.reporting import mean_std

log = logging.getLogger(__name__)

METHODS = ("random-real", "sre2l++", "cvdd")


@dataclass
class DistillPreset:
    """A whole-pipeline configuration.

    Attributes:
        description: one line for ``cvdd presets``.
        squeeze_preset: squeeze recipe and experts.
        recover_preset: recover hyper-parameters (IPC and committee size are set per method and IPC).
        methods: among ``random-real``, ``sre2l++`` (N = 1), ``cvdd`` (N = 2).
        ipcs: images per class to distil.
        evaluate: the frozen evaluation recipe shared by every method.
        small_budget: what ``cvdd bench --budget small`` changes, as override mappings under ``squeeze`` (recipe
            fields), ``recover`` and ``evaluate`` (default: 50 student epochs), besides keeping the first IPC and
            seed. Validated when the preset loads.
    """

    description: str = ""
    squeeze_preset: str = "digits"
    recover_preset: str = "digits"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ipcs: list[int] = field(default_factory=lambda: [1, 10])
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    small_budget: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, where: str = "distill preset") -> DistillPreset:
        """Check the evaluation recipe and every small-budget override; raise :class:`ConfigError` naming the key."""
        self.evaluate.validate()
        small = self.small_overrides()
        apply_overrides(self.evaluate, small["evaluate"], f"{where} small_budget.evaluate").validate()
        apply_overrides(Recipe(), small["squeeze"], f"{where} small_budget.squeeze").validate()
        recover = get_recover_preset(self.recover_preset)
        apply_overrides(recover, small["recover"], f"{where} small_budget.recover").validate()
        return self

    def small_overrides(self) -> dict[str, dict[str, Any]]:
        """The small budget's overrides per stage (``squeeze``, ``recover``, ``evaluate``), each a mapping."""
        unknown = sorted(set(self.small_budget) - {"squeeze", "recover", "evaluate"})
        if unknown:
            raise ConfigError(f"small_budget: unknown stage {unknown[0]!r}; choose squeeze, recover or evaluate")
        out = {k: dict(self.small_budget.get(k) or {}) for k in ("squeeze", "recover", "evaluate")}
        out["evaluate"].setdefault("epochs", 50)
        return out


def distill_presets() -> dict[str, DistillPreset]:
    """The shipped distill presets, validated."""
    out = {}
    for name, body in _load_yaml("distill.yaml").items():
        out[name] = from_dict(DistillPreset, body, f"distill preset '{name}'").validate(f"distill preset '{name}'")
    return out


def get_distill_preset(name: str) -> DistillPreset:
    presets = distill_presets()
    if name not in presets:
        raise ConfigError(f"unknown distill preset '{name}'; choose one of {', '.join(sorted(presets))}")
    return presets[name]


def _row(
    dataset: str, method: str, ipc: int, cfg: EvalConfig, soft: EvalResult, hard: EvalResult, seconds: dict[str, float]
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "method": method,
        "ipc": ipc,
        "student": cfg.student,
        "label_mode": cfg.label_mode,
        "seeds": soft.seeds,
        "acc": soft.accs,
        "acc_mean": soft.mean,
        "acc_std": soft.std,
        "hard_acc": hard.accs,
        "hard_acc_mean": hard.mean,
        "hard_acc_std": hard.std,
        "ior": None,
        "hlr": None,
        "label_bytes": soft.label_bytes,
        "seconds": seconds,
        "student_images_per_s": soft.images_per_s,
    }


# Recover fields the pipeline sets itself per method and IPC: an override of them would be silently replaced.
PIPELINE_OWNED = {
    "ipc": "the preset's IPCs (--ipc on the command line)",
    "committee_size": "the method (sre2l++: 1, cvdd: the preset's N; --methods on the command line)",
}


def check_recover_overrides(recover_overrides: dict[str, Any] | None) -> None:
    """Refuse recover overrides of the fields :func:`distill` sets itself (``ipc``, ``committee_size``).

    Raises:
        ConfigError: naming the field and where it is set instead.
    """
    refuse_owned(recover_overrides, PIPELINE_OWNED, "recover option", "the pipeline (per method and IPC)")


def check_settings(
    preset: DistillPreset,
    recover_overrides: dict[str, Any] | None = None,
    squeeze_overrides: dict[str, Any] | None = None,
) -> tuple[EvalConfig, Any]:
    """Check a preset's methods and evaluation and every stage's overrides.

    Called before any work (and by ``cvdd.distill`` before the dataset is read when the preset is named), so that
    a typo cannot cost a finished squeeze or a dataset decode.

    Returns:
        The validated evaluation recipe and the recover configuration with the overrides applied (before the
        per-method and per-IPC fields).

    Raises:
        ConfigError: one line naming the bad method, field or value.
    """
    for m in preset.methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose among {', '.join(METHODS)}")
    cfg = preset.evaluate.validate()
    check_recover_overrides(recover_overrides)
    base = apply_overrides(get_recover_preset(preset.recover_preset), recover_overrides or {}, "recover options")
    base.validate()
    apply_overrides(
        get_squeeze_preset(preset.squeeze_preset).recipe, squeeze_overrides or {}, "squeeze options"
    ).validate()
    return cfg, base


def distill(
    data: RealDataset,
    out: str | os.PathLike[str],
    preset: DistillPreset,
    *,
    experts_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    recover_overrides: dict[str, Any] | None = None,
    squeeze_overrides: dict[str, Any] | None = None,
    restart: bool = False,
) -> list[dict[str, Any]]:
    """Run the pipeline and write ``results.json``, ``results.md``, grids and the resolved config to ``out``.

    ``restart`` discards recover units and stored labels made with another configuration instead of refusing them.
    """
    from cvdd.api import load_pool, squeeze
    from cvdd.device import resolve_device
    from cvdd.evaluation.student import configure_teacher
    from cvdd.experts import list_experts, read_expert_meta
    from cvdd.labels.bssl import build_teacher

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, base = check_settings(preset, recover_overrides, squeeze_overrides)
    t_all = time.perf_counter()
    squeeze_peaks = PhasePeaks(device)  # peak memory per stage, for results.json and the report
    spec = data.spec

    # 1. squeeze: the committee (reused when already trained with the same recipe), or the user's experts.
    t0 = time.perf_counter()
    reuse = experts_dir is not None and bool(list_experts_or_empty(experts_dir))
    if reuse and _unfinished_squeeze(experts_dir, preset.squeeze_preset, seed):  # type: ignore[arg-type]
        log.info("%s holds part of this preset's committee: squeezing the rest", experts_dir)
        reuse = False
    if reuse:
        from cvdd.squeezing import SqueezeResult

        if squeeze_overrides:
            log.warning("squeeze options %s not used: the experts are reused from %s", squeeze_overrides, experts_dir)

        squeezed = []
        for path in list_experts(experts_dir):
            meta = read_expert_meta(path)
            squeezed.append(
                SqueezeResult(
                    path.stem,
                    meta["arch"],
                    path,
                    float(meta["test_acc"]),
                    float(meta.get("wall_seconds", 0.0)),
                    float(meta.get("images_per_s", 0.0)),
                    skipped=True,
                )
            )
    else:
        exp_dir = Path(experts_dir) if experts_dir is not None else out_dir / "experts"
        if experts_dir is not None and dd.is_main():
            exp_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(exp_dir / SQUEEZE_MARKER, json.dumps({"preset": preset.squeeze_preset, "seed": seed}))
        squeezed = squeeze(
            data,
            out=exp_dir,
            preset=preset.squeeze_preset,
            overrides=squeeze_overrides,
            seed=seed,
            device=device,
            progress=progress,
        )
    squeeze_s = time.perf_counter() - t0
    squeeze_peaks.mark("squeeze")
    pool = load_pool([r.path for r in squeezed], device=device)
    teacher = build_teacher(pool, cfg)
    # Set up as every evaluation below sets it (BN groups, precision): the row keys describe this teacher, and one
    # set up only by the first evaluation made the keys of later IPCs differ between a run and its rerun.
    configure_teacher(teacher, cfg, resolve_device(device))
    # Full real data with hard labels: the student architecture squeezed on all of it (HLR's reference).
    full = [r for r in squeezed if r.arch == cfg.student]
    if full:
        full_real_hard = full[0].test_acc
    else:
        ref = squeeze(
            data,
            archs=[cfg.student],
            out=out_dir / "reference",
            preset=preset.squeeze_preset,
            overrides=squeeze_overrides,
            seed=seed,
            device=device,
            progress=progress,
        )
        full_real_hard = ref[0].test_acc
    log.info(
        "squeeze: %s (%.0f s); full-data hard-label student %s: %.2f%%",
        ", ".join(f"{r.name} {100 * r.test_acc:.1f}%" for r in squeezed),
        squeeze_s,
        cfg.student,
        100 * full_real_hard,
    )

    rows: list[dict[str, Any]] = []
    for ipc in preset.ipcs:
        # 1. Every method's set at this IPC (recover resumes on its own), 2. the evaluations not finished yet
        # (with stack_seeds all their students train as one stacked model), 3. the rows, in method order.
        made = [_make_set(data, method, ipc, base, squeezed, out_dir, seed, device, progress, preset.recover_preset,
                          restart) for method in preset.methods]  # fmt: skip
        pending = []
        for s in made:
            # A finished evaluation of the very same images under the very same recipe is reused, so a killed
            # distill resumes without retraining students (recover and relabel resume on their own).
            digest = _data_digest(s["images"], s["labels"])  # the pixels are hashed once for every key below
            s["key"] = _row_key(digest, cfg, teacher.describe())
            legacy = [  # keys of older cvdd, whose rows stay valid (finished work is kept)
                _row_key(digest, cfg, teacher.describe(), ref=full_real_hard),
                _row_key(digest, cfg, None, ref=full_real_hard, experts=[r.name for r in squeezed]),
            ]
            s["row"], saved_key = _cached_row(s["run_dir"] / "row.json", [s["key"], *legacy])
            if s["row"] is not None:
                # HLR is the only field of a row that the reference student sets: it follows this run's reference
                # (squeezed again, the reference changes no evaluation, so the row's key leaves it out). The row is
                # saved again under this cvdd's key, which a later change of the reference still matches.
                hlr = full_real_hard - s["row"]["hard_acc_mean"]
                stale = s["row"]["hlr"] != hlr or saved_key != s["key"]
                s["row"]["hlr"] = hlr
                if stale and dd.is_main():
                    atomic_write_text(
                        s["run_dir"] / "row.json", json.dumps({"key": s["key"], "row": s["row"]}, indent=1)
                    )
                log.info(
                    "%s ipc %d: reusing the finished evaluation in %s", s["method"], ipc, s["run_dir"] / "row.json"
                )
            else:
                pending.append(s)
        reused = [s["row"].get("build") for s in made if s["row"] is not None]
        mixed = other_builds(f"finished evaluations at IPC {ipc} reused from {out_dir}", reused)
        if mixed:
            log.warning("%s; the results table lists the builds; --out elsewhere evaluates every set anew", mixed)
        hard_cfg = apply_overrides(cfg, {"label_mode": "hard"}, "evaluate")
        batches = [pending] if cfg.stack_seeds else [[s] for s in pending]
        for batch in batches:
            peaks = PhasePeaks(device)  # the evaluation's peaks (the high-water mark restarts here)
            jobs = []
            for s in batch:
                run_dir = s["run_dir"]
                label_dir = run_dir / "labels" if cfg.label_mode == "stored" else None
                students = run_dir / "students"
                jobs.append(EvalJob(s["images"], s["labels"], cfg, teacher, label_dir, students / "soft", restart))
                jobs.append(EvalJob(s["images"], s["labels"], hard_cfg, None, None, students / "hard"))
            results = evaluate_many(jobs, spec, data.test, device=device, progress=progress)
            peaks.mark("evaluate")
            for s, soft, hard in zip(batch, results[0::2], results[1::2]):
                s["row"] = _finish_row(s, soft, hard, cfg, squeeze_s, full_real_hard, squeeze_peaks, peaks, spec.name)
        rows.extend(s["row"] for s in made)
    for row in rows:
        ref_rows = [r for r in rows if r["method"] == "random-real" and r["ipc"] == row["ipc"]]
        if ref_rows:
            row["ior"] = row["acc_mean"] - ref_rows[0]["acc_mean"]
    total_s = time.perf_counter() - t_all
    priors, prior_sources = pool_priors(pool)
    resolved = {
        "preset": to_dict(preset),
        # What the run changed on top of the preset's squeeze and recover presets (the evaluation recipe above is
        # already the resolved one).
        "squeeze_overrides": dict(squeeze_overrides or {}),
        "recover_overrides": dict(recover_overrides or {}),
        "seed": seed,
        "dataset": spec.to_dict(),
        "data_source": data.source,
        "cvdd_version": __version__,
        "build": build_stamp(),
        "versions": _versions(),
        "full_real_hard_acc": full_real_hard,
        "experts": {r.name: read_expert_meta(r.path)["test_acc"] for r in squeezed},
        "teacher": teacher.describe(),
        # where the voting and teacher weights come from: `cvdd prior`, else the training accuracy (never the test)
        "priors": {n: {"value": v, "source": prior_sources[n]} for n, v in priors.items()},
        "total_seconds": total_s,
    }
    atomic_write_text(out_dir / "config.json", json.dumps(resolved, indent=1))
    atomic_write_text(out_dir / "results.json", json.dumps(rows, indent=1))
    atomic_write_text(out_dir / "results.md", results_markdown(rows, resolved))
    return rows


#: Written into an --experts folder before distill squeezes into it: the folder is this run's committee in the making.
SQUEEZE_MARKER = ".distill-squeeze.json"


def _unfinished_squeeze(experts_dir: str | os.PathLike[str], squeeze_preset: str, seed: int) -> bool:
    """Whether ``experts_dir`` is a committee that distill began squeezing (its marker names this preset and seed)
    and that lacks some of the preset's architectures: a distill killed during its squeeze, whose rerun must finish
    the committee rather than run with part of it. Experts squeezed by the user are never completed."""
    from cvdd.experts import list_experts, read_expert_meta

    marker = Path(experts_dir) / SQUEEZE_MARKER
    try:
        began = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False  # no marker: the user's own experts
    if began != {"preset": squeeze_preset, "seed": seed}:
        return False
    have = {read_expert_meta(p).get("arch") for p in list_experts(experts_dir)}
    return bool(set(get_squeeze_preset(squeeze_preset).archs) - have)


def method_overrides(method: str, ipc: int, base: Any) -> dict[str, Any]:
    """The recover overrides that make ``method`` (``sre2l++`` or ``cvdd``) at ``ipc`` from a recover preset.

    N = 1 for SRe2L++, 2 for CV-DD. A paper preset names its CV-DD committee policy (fixed pair, pairs, random);
    SRe2L++ is always one expert, so it gets ``single`` there. ``auto`` already resolves to ``single`` for N = 1
    and is left as it is, so runs made with the older presets keep their configuration hash (resume).
    """
    n = 1 if method == "sre2l++" else 2
    out: dict[str, Any] = {"ipc": ipc, "committee_size": n, "ipc_per_block": min(ipc, base.ipc_per_block)}
    if n == 1 and base.committee not in ("auto", "single"):
        out["committee"] = "single"
    return out


def _make_set(
    data: RealDataset,
    method: str,
    ipc: int,
    base: Any,
    squeezed: list[Any],
    out_dir: Path,
    seed: int,
    device: str | None,
    progress: bool,
    recover_preset: str,
    restart: bool = False,
) -> dict[str, Any]:
    """One method's set at one IPC: random real images, or recover with one expert (SRe2L++) or a committee."""
    from cvdd.api import recover
    from cvdd.synthesis.recover import save_grid

    run_dir = out_dir / method / f"ipc{ipc}"
    t0 = time.perf_counter()
    peaks = PhasePeaks(device)  # this set's peaks (the high-water mark restarts here)
    if method == "random-real":
        images, labels = random_real_set(data, ipc, seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_grid(images, data.spec, ipc, run_dir / "grid.png")
    else:
        rcfg = apply_overrides(base, method_overrides(method, ipc, base), "recover")
        res = recover(
            [r.path for r in squeezed],
            run_dir,
            dataset=data,
            seed=seed,
            device=device,
            progress=progress,
            overrides=to_dict(rcfg),
            preset=recover_preset,
            restart=restart,
        )
        images, labels = res.images, res.labels
    recover_s = time.perf_counter() - t0
    peaks.mark("recover")
    return {"method": method, "ipc": ipc, "run_dir": run_dir, "images": images, "labels": labels,
            "recover_s": recover_s, "peaks": peaks}  # fmt: skip


def _finish_row(
    s: dict[str, Any],
    soft: EvalResult,
    hard: EvalResult,
    cfg: EvalConfig,
    squeeze_s: float,
    full_real_hard: float,
    squeeze_peaks: PhasePeaks,
    eval_peaks: PhasePeaks,
    dataset: str,
) -> dict[str, Any]:
    """The results row of one set, written to its ``row.json`` (the students' checkpoints are then removed)."""
    method, ipc, run_dir = s["method"], s["ipc"], s["run_dir"]
    seconds = {
        "squeeze": squeeze_s,
        "recover": s["recover_s"],
        "relabel": soft.label_seconds,
        "evaluate": soft.seconds + hard.seconds,
    }
    row = _row(dataset, method, ipc, cfg, soft, hard, seconds)
    # Peak resident memory (MiB; "_gpu": peak allocated on the GPU) while this row's set was made and evaluated
    # (with stack_seeds, the evaluation of every set of the IPC at once); squeeze is the run's (zero-cost when
    # the experts were reused).
    row["memory"] = {
        f"{stage}_peak_{'gpu_alloc' if stage.endswith('_gpu') else 'rss'}_mib".replace("_gpu_peak", "_peak"): round(
            v, 1
        )
        for stage, v in {**squeeze_peaks.peaks, **s["peaks"].peaks, **eval_peaks.peaks}.items()
    }
    row["hlr"] = full_real_hard - hard.mean
    row["build"] = build_stamp()
    run_dir.mkdir(parents=True, exist_ok=True)
    if dd.is_main():  # one writer (the ranks hold the same row)
        atomic_write_text(run_dir / "row.json", json.dumps({"key": s["key"], "row": row}, indent=1))
        # The row holds the result now; the students' checkpoints only served an interrupted run.
        shutil.rmtree(run_dir / "students", ignore_errors=True)
    log.info(
        "%s ipc %d: %.2f ± %.2f%% (%s labels), hard %.2f%%",
        method,
        ipc,
        100 * soft.mean,
        100 * soft.std,
        cfg.label_mode,
        100 * hard.mean,
    )
    return row


def _data_digest(images: Any, labels: Any) -> Any:
    """sha256 state after the set's pixels and labels: what every row key of the set starts from."""
    import hashlib

    from cvdd.artifacts import update_digest, update_pixel_digest

    h = hashlib.sha256()
    update_pixel_digest(h, images)  # a uint8 set keys as its float32 copy did
    update_digest(h, labels)
    return h


def _row_key(
    data: Any,
    cfg: EvalConfig,
    teacher: dict[str, Any] | None,
    *,
    ref: float | None = None,
    experts: list[str] | None = None,
) -> str:
    """Hash of what determines an evaluation: the pixels and labels (``data``, from :func:`_data_digest`), the
    recipe, the teacher (its experts, their weight files and weights: a prior measured since, or experts squeezed
    again, make other rows).

    ``ref`` (the reference student's accuracy) and ``experts`` (names, with ``teacher`` None) give the keys of older
    cvdd: rows keyed on the reference, and rows finished before the teacher was part of the key, which named only
    the experts. Those rows are still reused (finished work is kept).
    """
    h = data.copy()
    who: dict[str, Any] = {"teacher": teacher} if experts is None else {"experts": experts}
    if ref is not None:
        who["ref"] = ref
    h.update(json.dumps({"cfg": cfg.identity(), **who}, sort_keys=True).encode())
    return str(h.hexdigest()[:24])


def _cached_row(path: Path, keys: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """A finished row saved under one of ``keys`` (this cvdd's first, then older ones) and the key it was saved
    under, else (None, None)."""
    if not path.is_file():
        return None, None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(saved, dict) or saved.get("key") not in keys:
        return None, None
    return saved["row"], saved["key"]


def _versions() -> dict[str, str]:
    """Versions that can change results: Python, torch, torchvision, numpy (with the CUDA build, if any)."""
    import platform

    import numpy
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "cuda": str(torch.version.cuda),
    }


def list_experts_or_empty(folder: str | os.PathLike[str]) -> list[Path]:
    """Experts in ``folder``, or [] when the folder does not exist yet."""
    from cvdd.experts import list_experts

    return list_experts(folder) if Path(folder).is_dir() else []


def results_markdown(rows: list[dict[str, Any]], resolved: dict[str, Any]) -> str:
    """The results table (mean ± std over seeds, IOR, HLR, time per stage) as Markdown."""
    lines = [
        f"# cvdd distill: {resolved['dataset']['name']}",
        "",
        f"cvdd {resolved['cvdd_version']}, seed {resolved['seed']}, total {resolved['total_seconds']:.0f} s. "
        f"Top-1 (%) on the real test set after the final epoch, mean ± std over seeds. IOR: gain over random "
        f"real images under the identical recipe and teacher. HLR: full-data hard-label accuracy "
        f"({100 * resolved['full_real_hard_acc']:.2f}%) minus the set's hard-label accuracy.",
        "",
        "| method | IPC | student | labels | top-1 | IOR | hard-label top-1 | HLR | recover s | relabel s | "
        "evaluate s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ior = "-" if r["ior"] is None else f"{100 * r['ior']:+.2f}"
        n = len(r["seeds"])
        soft, hard = mean_std(r["acc_mean"], r["acc_std"], n), mean_std(r["hard_acc_mean"], r["hard_acc_std"], n)
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['student']} | {r['label_mode']} | {soft} "
            f"| {ior} | {hard} | {100 * r['hlr']:.2f} | "
            f"{r['seconds']['recover']:.0f} | {r['seconds']['relabel']:.0f} | {r['seconds']['evaluate']:.0f} |"
        )
    lines += [
        "",
        "Experts (test top-1): " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in resolved["experts"].items()),
        f"Teacher: {resolved['teacher']}",
    ]
    if resolved.get("priors"):  # runs written before priors were recorded have none
        source = {"prior": "measured by `cvdd prior`", "train_acc": "training accuracy", "equal": "equal"}
        lines.append(
            "Voting and teacher priors: "
            + ", ".join(f"{k} {p['value']:.2f} ({source[p['source']]})" for k, p in resolved["priors"].items())
        )
    if any(r["label_mode"] == "stored" for r in rows):
        lines.append(
            "Stored labels: every seed replays the same augmentations and soft labels, so the std covers the "
            "students' initial weights only."
        )
    lines.append("")
    changed = {k: resolved.get(f"{k}_overrides") for k in ("squeeze", "recover")}
    if any(changed.values()):
        # A table made with --set squeeze.* / recover.* is not the preset's recipe: say so beside the numbers.
        lines += [
            f"Changed from the presets (`{resolved['preset']['squeeze_preset']}` squeeze, "
            f"`{resolved['preset']['recover_preset']}` recover): "
            + "; ".join(f"{k} {v}" for k, v in changed.items() if v)
            + ".",
            "",
        ]
    by_build: dict[str, list[str]] = {}
    for r in rows:
        by_build.setdefault(describe_build(r.get("build")), []).append(f"{r['method']} IPC {r['ipc']}")
    if set(by_build) != {describe_build(resolved.get("build"))}:
        # A re-run reuses finished rows: after cvdd or torch changed, they are not this build's measurements.
        parts = [f"{build}: {', '.join(names)}" for build, names in sorted(by_build.items())]
        lines += [
            f"Rows reused from earlier runs are measured by another build than this run's "
            f"({describe_build(resolved.get('build'))}); by build: " + "; ".join(parts) + ".",
            "",
        ]
    return "\n".join(lines)
