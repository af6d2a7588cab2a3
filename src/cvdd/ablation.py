"""``cvdd ablate``: compare recover/relabel configurations on a validation split, then test the chosen ones once.

The validation split is carved from the training set (``val_per_class`` images per class, seeded) and removed
from the pool that initialisation and the random-real baseline draw from; the students of every configuration
are scored on it. The test set is touched only by ``--final NAME...``, which evaluates the named
configurations' very same synthetic sets on the real test split and records that it did.

Caveat written into every table: experts squeezed on the full training set have seen the validation images,
so validation scores rank configurations but are not an unbiased estimate; the final test scores are.

A grid is a mapping ``name -> {method, recover, evaluate, set}``: ``method`` is ``random-real``, ``sre2l++``
(committee of one) or ``cvdd`` (committee of two unless ``recover.committee_size`` says otherwise), ``recover``
and ``evaluate`` override the preset's fields, and ``set: OTHER`` reuses configuration OTHER's synthetic set
(its method and recover settings, the very same images; its ``evaluate`` overrides with this one's on top) so
that only the evaluation side (teacher, BSSL, student recipe) differs. Each row's gain is measured against
the random-real row with the same ``evaluate`` overrides when the grid has one (a teacher variant of the
random-real set), else against the plain random-real row. Grids ship in ``presets/ablate.yaml`` or come from
a YAML file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cvdd.artifacts import atomic_write_text, pixel_digest
from cvdd.config import _load_yaml, apply_overrides, get_recover_preset, to_dict
from cvdd.data.augment import unit_float
from cvdd.data.sources import RealDataset, TensorSplit
from cvdd.errors import ConfigError, DataError
from cvdd.reporting import mean_std

log = logging.getLogger(__name__)

METHODS = ("random-real", "sre2l++", "cvdd")


@dataclass
class AblationConfig:
    """One configuration of a grid.

    Attributes:
        name: row name (also its folder).
        method: ``random-real``, ``sre2l++`` or ``cvdd``.
        recover: RecoverConfig overrides on top of the recover preset.
        evaluate: EvalConfig overrides on top of the distill preset's evaluation recipe.
        set: name of the configuration whose synthetic set this one evaluates (None: its own).
    """

    name: str
    method: str
    recover: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    set: str | None = None

    @property
    def is_baseline(self) -> bool:
        """The plain random-real row, which every selection (``--only``, ``--final``) keeps."""
        return self.method == "random-real" and self.set is None

    @property
    def set_name(self) -> str:
        """The folder of the synthetic set under ``<out>/sets``."""
        return self.set or self.name


def load_grid(grid: str | os.PathLike[str]) -> list[AblationConfig]:
    """A shipped grid by name (``presets/ablate.yaml``) or a YAML file of ``name: {method, recover, evaluate}``."""
    import yaml

    path = Path(grid)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"grid file not found: {path}")
        body = yaml.safe_load(path.read_text()) or {}
    else:
        grids = _load_yaml("ablate.yaml")
        if str(grid) not in grids:
            raise ConfigError(f"unknown grid {str(grid)!r}; shipped grids: {', '.join(grids)} (or give a .yaml file)")
        body = grids[str(grid)]["configs"]
    if not isinstance(body, dict) or not body:
        raise ConfigError(f"grid {grid} must map configuration names to {{method, recover, evaluate}}")
    out = []
    for name, cfg in body.items():
        cfg = cfg or {}
        unknown = set(cfg) - {"method", "recover", "evaluate", "set"}
        if unknown:
            raise ConfigError(f"grid {grid}, configuration {name!r}: unknown key {sorted(unknown)[0]!r}")
        ref = cfg.get("set")
        if ref is not None:
            if ref not in body or (body[ref] or {}).get("set") is not None:
                raise ConfigError(
                    f"grid {grid}, configuration {name!r}: set {ref!r} is not a configuration with its own set"
                )
            if "method" in cfg or "recover" in cfg:
                raise ConfigError(
                    f"grid {grid}, configuration {name!r}: a configuration with set takes no method or recover"
                )
            # The referenced configuration's evaluation settings, with this one's on top.
            evaluate = {**((body[ref] or {}).get("evaluate") or {}), **(cfg.get("evaluate") or {})}
            cfg = {**(body[ref] or {}), "evaluate": evaluate, "set": str(ref)}
        method = cfg.get("method", "cvdd")
        if method not in METHODS:
            raise ConfigError(f"grid {grid}, configuration {name!r}: unknown method {method!r}")
        out.append(
            AblationConfig(
                str(name),
                method,
                dict(cfg.get("recover") or {}),
                dict(cfg.get("evaluate") or {}),
                cfg.get("set"),
            )
        )
    return out


def carve_validation(real: RealDataset, per_class: int, seed: int = 0) -> RealDataset:
    """The dataset with ``per_class`` training images per class moved into its evaluation split.

    Returns:
        A :class:`RealDataset` whose ``train`` lacks the carved images and whose ``test`` is exactly them.
    """
    if not isinstance(real.train, TensorSplit):
        raise DataError("ablate carves its validation split from in-memory datasets (<= 64 px) only")
    labels = real.train.labels.cpu()
    gen = torch.Generator().manual_seed(seed)
    val_idx = []
    for c in range(real.spec.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) <= per_class:
            raise DataError(
                f"class {real.spec.classes[c]!r} has {len(idx)} training images; "
                f"cannot carve {per_class} for validation"
            )
        val_idx.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    val = torch.cat(val_idx)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    train = TensorSplit(real.train.images[keep], real.train.labels[keep])
    test = TensorSplit(real.train.images[val], real.train.labels[val])
    # Its own fingerprint: a set recovered from this pool (init real or patches) differs from one recovered from
    # the whole training set, or from another carve's pool (recover keys its units on it).
    fingerprint = hashlib.sha256(f"{real.fingerprint}:carve:{per_class}:{seed}".encode()).hexdigest()[:16]
    return RealDataset(real.spec, train, test, f"{real.source} (validation carve)", fingerprint)


def with_baselines(configs: list[AblationConfig], names: Iterable[str]) -> list[AblationConfig]:
    """The configurations named, plus the random-real rows they are compared with: the plain one, and each
    random-real variant evaluated the same way as a named configuration (same teacher, BSSL...)."""
    names = set(names)
    evals = {json.dumps(c.evaluate, sort_keys=True) for c in configs if c.name in names}
    return [
        c
        for c in configs
        if c.name in names
        or c.is_baseline
        or (c.method == "random-real" and json.dumps(c.evaluate, sort_keys=True) in evals)
    ]


def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_ablation(
    real: RealDataset,
    experts: str | os.PathLike[str],
    configs: list[AblationConfig],
    out: str | os.PathLike[str],
    *,
    ipc: int,
    preset: str = "cifar10-cpu",
    seeds: list[int] | None = None,
    val_per_class: int = 100,
    final: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every configuration on the validation split (or the ``final`` ones on the test split).

    Args:
        real: the real dataset (its test split is used only with ``final``).
        experts: folder of squeezed experts (the pool and the teacher).
        configs: the grid.
        out: output folder (``<out>/<split>/<name>/``; ``ablation-<split>.json`` and ``.md``).
        ipc: images per class.
        preset: distill preset naming the recover preset and the evaluation recipe.
        seeds: student seeds (default: the preset's).
        val_per_class: validation images carved per class from the training set.
        final: names of configurations to evaluate on the test split (their synthetic sets are the ones made
            for validation: the images never depend on the evaluation split).
        seed: run seed (validation carve, recover, random-real draw).

    Returns:
        The table rows (also written as JSON and Markdown).
    """
    from cvdd.api import load_pool, recover
    from cvdd.evaluation.student import evaluate_synthetic, random_real_set
    from cvdd.labels.bssl import build_teacher
    from cvdd.pipeline import get_distill_preset, method_overrides
    from cvdd.synthesis.recover import load_synthetic

    chosen = get_distill_preset(preset)
    base_eval = chosen.evaluate
    if seeds:
        base_eval = apply_overrides(base_eval, {"seeds": list(seeds)}, "ablate seeds")
    carved = carve_validation(real, val_per_class, seed)
    split = "test" if final else "validation"
    if final:
        names = {c.name for c in configs}
        missing = [n for n in final if n not in names]
        if missing:
            raise ConfigError(f"--final names unknown configurations: {', '.join(missing)}")
        configs = with_baselines(configs, final)
    evaluation = carved if not final else RealDataset(real.spec, carved.train, real.test, real.source, real.fingerprint)
    pool = load_pool(experts, device=device)
    out_dir = Path(out)
    rows: list[dict[str, Any]] = []
    for c in configs:
        t0 = time.perf_counter()
        cfg = apply_overrides(base_eval, c.evaluate, f"configuration {c.name} evaluate").validate()
        set_dir = out_dir / "sets" / c.set_name
        info: dict[str, Any] = {}
        if c.method == "random-real":
            images, labels = random_real_set(carved, ipc, seed)
            recover_s = 0.0
        else:
            base = get_recover_preset(chosen.recover_preset)
            over = {**method_overrides(c.method, ipc, base), **c.recover}  # as distill makes the method
            res = recover(
                experts,
                set_dir,
                preset=chosen.recover_preset,
                overrides=over,
                dataset=carved,
                seed=seed,
                device=device,
                progress=progress,
            )
            recover_s = time.perf_counter() - t0
            images, labels, meta = load_synthetic(res.path)
            units = meta.get("units", [])
            info["pixel_change_255"] = statistics.fmean(u["mean_abs_change"] for u in units) if units else None
            accs: dict[str, list[float]] = {}
            for u in units:
                for n, a in u["expert_accuracy"].items():
                    accs.setdefault(n, []).append(a)
            info["experts_on_synthetic"] = {n: statistics.fmean(a) for n, a in accs.items()}
        teacher = None if cfg.label_mode == "hard" else build_teacher(pool, cfg)
        digest = pixel_digest(images)[:16]
        key = _key(
            {
                "images": digest,
                "eval": cfg.identity(),
                "split": split,
                "val": [val_per_class, seed],
                **({"teacher": teacher.describe()} if teacher is not None else {}),
            }
        )
        row_path = out_dir / split / c.name / "row.json"
        diversity = within_class_correlation(images, labels)
        if row_path.is_file():
            saved = json.loads(row_path.read_text())
            if saved.get("key") == key:
                rows.append({**saved["row"], "within_class_correlation": diversity})
                log.info("%s: reusing %s", c.name, row_path)
                continue
        label_dir = out_dir / "labels" / c.name if cfg.label_mode == "stored" else None
        res_eval = evaluate_synthetic(
            images,
            labels,
            real.spec,
            evaluation.test,
            cfg,
            teacher=teacher,
            label_dir=label_dir,
            device=device,
            progress=progress,
        )
        row = {
            "name": c.name,
            "method": c.method,
            "ipc": ipc,
            "split": split,
            "recover": c.recover,
            "evaluate": c.evaluate,
            **({"set": c.set} if c.set else {}),
            "seeds": res_eval.seeds,
            "acc": res_eval.accs,
            "acc_mean": res_eval.mean,
            "acc_std": res_eval.std,
            "seconds": {"recover": recover_s, "relabel": res_eval.label_seconds, "evaluate": res_eval.seconds},
            "wall_seconds": time.perf_counter() - t0,
            "within_class_correlation": diversity,
            **info,
        }
        row_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(row_path, json.dumps({"key": key, "row": row}, indent=1))
        rows.append(row)
        log.info("%s: %.2f ± %.2f%% on %s", c.name, 100 * row["acc_mean"], 100 * row["acc_std"], split)
    # Each row is compared with the random-real row evaluated the same way (same evaluate overrides: teacher,
    # BSSL...) when the grid has one, otherwise with the plain random-real row.
    same_eval = {json.dumps(r["evaluate"], sort_keys=True): r for r in rows if r["method"] == "random-real"}
    plain = next((r for r in rows if r["method"] == "random-real" and "set" not in r), None)
    for r in rows:
        ref = same_eval.get(json.dumps(r["evaluate"], sort_keys=True), plain)
        r["gain_over_random_real"] = r["acc_mean"] - ref["acc_mean"] if ref else None
        r["random_real_reference"] = ref["name"] if ref else None
    header = {
        "split": split,
        "ipc": ipc,
        "preset": preset,
        "val_per_class": val_per_class,
        "seed": seed,
        "experts": [e.name for e in pool],
        "eval": to_dict(base_eval),
    }
    atomic_write_text(out_dir / f"ablation-{split}.json", json.dumps({"header": header, "rows": rows}, indent=1))
    atomic_write_text(out_dir / f"ablation-{split}.md", ablation_markdown(rows, header))
    if final:
        # Every look at the test split is kept (the tables above hold only the latest selection): how often, and
        # at what, the test split was looked is part of an honest report.
        touch = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **{k: header[k] for k in ("ipc", "preset", "val_per_class", "seed")},
            "rows": {r["name"]: [r["acc_mean"], r["acc_std"]] for r in rows},
        }
        with open(out_dir / "test-split-looks.jsonl", "a") as f:
            f.write(json.dumps(touch) + "\n")
    return rows


def within_class_correlation(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean Pearson correlation between the images of a class (pixels as one vector), averaged over classes.

    1 when every image of a class is the same, about 0.09 for random real CIFAR-10 images at IPC 10: it tells
    whether a synthetic set collapsed onto one pattern per class.
    """
    out = []
    for c in labels.unique():
        g = unit_float(images[labels == c].flatten(1))
        if len(g) < 2:
            continue
        g = g - g.mean(1, keepdim=True)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        n = len(g)
        out.append(float(((g @ g.T).sum() - n) / (n * (n - 1))))
    return statistics.fmean(out) if out else 0.0


def ablation_markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The table: configuration, top-1 mean ± std, gain over random real, pixel change, experts' top-1, cost."""
    split = header["split"]
    lines = [
        f"# Ablation on the {split} split (IPC {header['ipc']}, preset {header['preset']}, "
        f"{len(rows[0]['seeds']) if rows else 0} seeds)",
        "",
    ]
    if split == "validation":
        lines += [
            f"Validation: {header['val_per_class']} training images per class carved out (seed {header['seed']}) and "
            "excluded from initialisation and random-real draws. The experts were squeezed on the full training "
            "set and have seen them: these scores rank configurations; the test split is touched only by --final.",
            "",
        ]
    lines += [
        "| configuration | method | overrides | top-1 % | gain vs random real | pixel change /255 "
        "| within-class correlation | experts on set % | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = r.get("pixel_change_255")
        over = ", ".join(f"{k}={v}" for k, v in {**r["recover"], **r["evaluate"]}.items()) or "-"
        gain = r.get("gain_over_random_real")
        ref = r.get("random_real_reference")
        vs = f" (vs {ref})" if ref and ref != "random-real" and ref != r["name"] else ""
        exp = r.get("experts_on_synthetic")
        lines.append(
            f"| {r['name']} | {r['method']} | {over} | {mean_std(r['acc_mean'], r['acc_std'], len(r['seeds']))} | "
            f"{'' if gain is None else f'{100 * gain:+.2f}'}{vs} | "
            f"{'-' if change is None else f'{change:.1f}'} | {r.get('within_class_correlation', 0.0):.2f} | "
            f"{'-' if not exp else f'{100 * statistics.fmean(exp.values()):.0f}'} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
