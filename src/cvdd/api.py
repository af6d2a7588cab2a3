"""The Python API: one function per CLI subcommand, with the same names and options.

>>> import cvdd
>>> results = cvdd.squeeze("digits", archs=["convnet_d3_w32"], out="runs/experts", epochs=2)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cvdd.data.sources import RealDataset, TensorSplit
from cvdd.data.sources import load_dataset as _load_dataset
from cvdd.distributed import Shard
from cvdd.errors import ConfigError, CvddError, DataError
from cvdd.experts import Expert
from cvdd.labels.bssl import build_teacher
from cvdd.models import ModelInfo, count_parameters, create_model, forward_mflops, list_models, model_info
from cvdd.squeezing import SqueezeResult, resolve_squeeze_config, squeeze_experts
from cvdd.synthesis.recover import RecoverResult, merge_units, recover_images

log = logging.getLogger(__name__)


def load_dataset(
    dataset: str | os.PathLike[str] = "digits",
    *,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    class_order: list[str] | None = None,
    progress: bool = True,
) -> RealDataset:
    """Load a real dataset by name (``digits``, ``cifar10``, ``cifar100``...) or ImageFolder path/tarball.

    See :func:`cvdd.data.sources.load_dataset` for the arguments.
    """
    return _load_dataset(
        dataset,
        data=data,
        cache_dir=cache_dir,
        download=download,
        image_size=image_size,
        class_order=class_order,
        progress=progress,
    )


def _real(
    dataset: str | os.PathLike[str] | RealDataset,
    data: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    download: bool,
    progress: bool,
) -> RealDataset:
    """An already loaded dataset as it is, or a name/path loaded (from the cache when possible)."""
    if isinstance(dataset, RealDataset):
        return dataset
    return load_dataset(dataset, data=data, cache_dir=cache_dir, download=download, progress=progress)


def squeeze(
    dataset: str | os.PathLike[str] | RealDataset = "digits",
    archs: list[str] | None = None,
    out: str | os.PathLike[str] = "runs/experts",
    *,
    data: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    epochs: int | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    progress: bool = True,
) -> list[SqueezeResult]:
    """Train a committee of experts on a real dataset (``cvdd squeeze``).

    Args:
        dataset: a dataset name or ImageFolder path/tarball, or an already loaded :class:`RealDataset`.
        archs: architectures to train (default: the preset's).
        out: folder for the experts (``<arch>.safetensors`` + ``<arch>.json``).
        data: where a named dataset lives (folder or tarball).
        preset: squeeze preset (default: the dataset's, e.g. ``digits``, ``cifar10``: the paper's recipe, a GPU job;
            pass ``cifar10-cpu`` on a CPU).
        epochs: override the preset's epochs.
        overrides: other recipe fields to override (``{"lr": 0.1}``).
        seed: run seed (each expert derives its own from it and its name).
        device: ``cpu``, ``cuda`` or None for automatic.
        force: retrain experts that are already finished.
        cache_dir: decoded-dataset cache (default ``~/.cache/cvdd``).
        download: let torchvision download CIFAR files.
        progress: progress bars.

    Returns:
        One :class:`SqueezeResult` per architecture, in order.
    """
    if preset is not None:  # a typo fails before a download or decode, not after
        from cvdd.config import get_squeeze_preset

        get_squeeze_preset(preset)
    for arch in archs or []:
        model_info(arch)
    real = _real(dataset, data, cache_dir, download, progress)
    _, arch_list, recipe = resolve_squeeze_config(real, archs, preset, epochs, overrides)
    return squeeze_experts(
        real,
        arch_list,
        recipe,
        out,
        preset_name=preset or real.spec.default_preset,
        seed=seed,
        device=device,
        force=force,
        progress=progress,
    )


def models(num_classes: int = 10, image_size: int | None = None) -> list[dict[str, Any]]:
    """Describe every registered architecture (``cvdd models``).

    Returns:
        One dict per (architecture, input size): name, family, image_size, params, mflops, description.
    """
    rows = []
    for name in list_models():
        info: ModelInfo = model_info(name)
        for size in info.input_sizes:
            if image_size is not None and size != image_size:
                continue
            model = create_model(name, num_classes, size)
            rows.append(
                {
                    "name": name,
                    "family": info.family,
                    "image_size": size,
                    "params": count_parameters(model),
                    "mflops": forward_mflops(name, num_classes, size),
                    "description": info.description,
                }
            )
    return rows


def _dataset_for_experts(meta: dict[str, Any]) -> tuple[str, str | None] | None:
    """The dataset an expert was squeezed on (``meta``: its metadata), as ``load_dataset``'s ``dataset`` and
    ``data`` arguments; None if it is gone.

    A folder or tarball squeezed under a known name (``--dataset cifar100 --data DIR``) is loaded under that name
    again: loaded as a bare path it would get the folder's name and ImageNet's normalisation.
    """
    from cvdd.data.specs import DatasetSpec, canonical_name, known_constants
    from cvdd.errors import DataError

    source = meta.get("dataset_source")
    if not source:
        return None
    if source.startswith("torchvision:"):
        return source.split(":", 1)[1], None
    if source == "digits":
        return source, None
    if not os.path.exists(source):
        return None
    try:
        stored = DatasetSpec.from_dict(meta.get("dataset") or {})
    except (KeyError, TypeError, ValueError):  # no usable description: the path alone
        return source, None
    name = canonical_name(stored.name)
    if name in (None, "digits"):
        return source, None
    # A folder that merely is called like a known dataset (/data/cifar100 loaded by its path) kept the folder
    # constants: named only when the stored size and normalisation are that name's (the experts' own check).
    try:
        DatasetSpec(name, stored.classes, **known_constants(name)).check_compatible(stored, "")
    except DataError:
        return source, None
    return name, source


def _source_or_experts(
    dataset: str | os.PathLike[str] | RealDataset | None, meta: dict[str, Any], data: str | os.PathLike[str] | None
) -> tuple[Any, str | os.PathLike[str] | None]:
    """``(dataset, data)`` when a dataset is given, else the dataset the experts were squeezed on (``meta``: one
    expert's metadata) as ``load_dataset`` arguments.

    Raises:
        ConfigError: no dataset given and the experts' one is gone (a folder moved, a deleted tarball).
    """
    if dataset is not None:
        return dataset, data
    found = _dataset_for_experts(meta)
    if found is None:
        raise ConfigError(f"the experts' dataset ({meta.get('dataset_source')}) is not available; give --dataset")
    return found if data is None else (found[0], data)


def _found_experts(experts: str | os.PathLike[str]) -> list[Path]:
    """The finished experts of a folder; a one-line error when there are none."""
    from cvdd.errors import ArtifactError
    from cvdd.experts import list_experts

    paths = list_experts(experts)
    if not paths:
        raise ArtifactError(f"no experts found in {experts} (run `cvdd squeeze` first)")
    return paths


def load_pool(
    experts: str | os.PathLike[str] | list[str | os.PathLike[str]],
    pool: list[str] | None = None,
    device: str | None = None,
) -> list[Expert]:
    """Load the experts of a folder (or a list of expert files), optionally only/ordered by ``pool`` names."""
    from cvdd.device import resolve_device
    from cvdd.errors import ArtifactError
    from cvdd.experts import load_expert

    paths = _found_experts(experts) if isinstance(experts, str | os.PathLike) else [Path(p) for p in experts]
    if not paths:
        raise ArtifactError("no experts given")
    by_name = {Path(p).stem: p for p in paths}
    if pool:
        missing = [n for n in pool if n not in by_name]
        if missing:
            raise ArtifactError(f"expert {missing[0]!r} not found; available: {', '.join(sorted(by_name))}")
        paths = [by_name[n] for n in pool]
    dev = resolve_device(device)
    loaded = [load_expert(p, device=dev) for p in paths]
    for e in loaded[1:]:
        try:
            loaded[0].spec.check_compatible(e.spec, f"expert {e.name}")
        except CvddError as exc:
            raise ArtifactError(f"the experts disagree: {exc}") from None
    return loaded


def recover(
    experts: str | os.PathLike[str] | list[str | os.PathLike[str]] = "runs/experts",
    out: str | os.PathLike[str] = "runs/synthetic",
    *,
    ipc: int | None = None,
    committee_size: int | None = None,
    committee: str | None = None,
    voting: str | None = None,
    iterations: int | None = None,
    lr: float | None = None,
    init: str | None = None,
    preset: str | None = None,
    pool: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    dataset: str | os.PathLike[str] | RealDataset | None = None,
    data: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    restart: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard: Shard | str | None = None,
) -> RecoverResult:
    """Synthesise IPC images per class with a voting committee of experts (``cvdd recover``).

    Args:
        experts: folder of squeezed experts, or a list of expert files; they form the pool.
        out: output folder (``synthetic.safetensors`` + ``.json``, ``grid.png``, ``units/``).
        ipc, committee_size, committee, voting, iterations, lr, init: the most used
            :class:`~cvdd.synthesis.recover.RecoverConfig` fields (None keeps the preset's value).
        preset: recover preset (default: the dataset's own, e.g. ``digits``, ``cifar10``).
        pool: names (and order) of the experts to use from the folder.
        overrides: any other RecoverConfig fields.
        dataset: real data for the initialisation (default: the dataset the experts were squeezed on).
        data: where a named dataset lives.
        seed: run seed; the same seed gives bit-identical images on the same machine.
        device: ``cpu``, ``cuda`` or None for automatic.
        restart: discard finished units made with another configuration instead of refusing.
        cache_dir: decoded-dataset cache.
        progress: progress bar.
        shard: ``"i/n"`` or a :class:`~cvdd.distributed.Shard`: run only this job's units (job arrays; assemble
            with :func:`merge`). Default: this rank's share under ``torchrun``, else every unit.

    Returns:
        The :class:`~cvdd.synthesis.recover.RecoverResult` (``path`` None while other shards are unfinished).
    """
    from cvdd.config import apply_overrides, get_recover_preset

    loaded = load_pool(experts, pool, device)
    spec = loaded[0].spec
    cfg = get_recover_preset(preset or spec.default_preset)
    explicit = {
        "ipc": ipc,
        "committee_size": committee_size,
        "committee": committee,
        "voting": voting,
        "iterations": iterations,
        "lr": lr,
        "init": init,
    }
    merged = {**{k: v for k, v in explicit.items() if v is not None}, **(overrides or {})}
    if merged.get("committee_size") == 1 and "committee" not in merged and cfg.committee not in ("auto", "single"):
        # N = 1 is SRe2L++ (one expert), also under a paper preset that names its CV-DD committee policy
        merged["committee"] = "single"
    cfg = apply_overrides(cfg, merged, "recover options").validate(len(loaded))
    real: RealDataset | None = None
    if cfg.init in ("patches", "real"):
        if isinstance(dataset, RealDataset):
            real = dataset
        else:
            source, where = _source_or_experts(dataset, loaded[0].meta, data)
            real = load_dataset(source, data=where, cache_dir=cache_dir, progress=progress)
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    return recover_images(
        loaded, cfg, out, data=real, seed=seed, device=device, progress=progress, restart=restart, shard=shard
    )


def merge(out: str | os.PathLike[str]) -> RecoverResult:
    """Assemble a recover run made by independent shards into its synthetic set (``cvdd merge``)."""
    return merge_units(out)


def export(synthetic: str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "png") -> int:
    """Write a synthetic set for other tools (``cvdd export``); returns the number of images.

    Args:
        synthetic: a recover output (folder or ``synthetic.safetensors``).
        out: destination folder, or for ``npz``/``safetensors`` a file (``out/images.<format>`` otherwise);
            it must not exist yet (or be an empty folder).
        format: ``png`` (ImageFolder, lossless), ``jpeg`` (quality 75), ``npz`` (uint8 (N, H, W, 3), labels,
            class names), ``safetensors`` (uint8 (N, 3, H, W), labels, class names in the header) or ``hf``
            (``train/<class>/*.png`` for Hugging Face ``load_dataset("imagefolder", data_dir=out)``).
    """
    from cvdd.synthesis.export import export_synthetic

    return export_synthetic(synthetic, out, format)


def _synthetic_or_random(
    synthetic: str | os.PathLike[str],
    pool: list[Expert],
    ipc: int | None,
    dataset: Any,
    data: Any,
    cache_dir: Any,
    seed: int,
    progress: bool,
) -> tuple[Any, ...]:
    """(images, labels, real dataset) for a synthetic set or the ``random-real`` baseline.

    ``synthetic`` is a recover output, ``random-real``, or an external set (:mod:`cvdd.data.external`): a folder
    of class sub-folders named like the dataset's classes, or a ``cvdd export`` ``.npz``/``.safetensors`` file.
    """
    from cvdd.data.external import is_external_set, load_external_set
    from cvdd.evaluation.student import random_real_set
    from cvdd.synthesis.recover import load_synthetic

    source, where = _source_or_experts(dataset, pool[0].meta, data)
    real = (
        source
        if isinstance(source, RealDataset)
        else load_dataset(source, data=where, cache_dir=cache_dir, progress=progress)
    )
    real.spec.check_compatible(pool[0].spec, "the experts' dataset")
    if os.fspath(synthetic) == "random-real":
        if ipc is None:
            raise ConfigError("the random-real baseline needs --ipc")
        images, labels = random_real_set(real, ipc, seed)
    elif is_external_set(synthetic):
        images, labels = load_external_set(synthetic, real.spec)
    else:
        images, labels, _ = load_synthetic(synthetic, real.spec)
    return images, labels, real


def _eval_recipe(
    preset: str | None, pool: list[Expert], overrides: dict[str, Any] | None, where: str
) -> tuple[Any, Any]:
    """The evaluation recipe of ``evaluate``, ``relabel`` and ``prior`` (one rule for the three).

    Returns:
        (the validated :class:`~cvdd.evaluation.student.EvalConfig` with ``overrides``, the distill preset it
        came from or None). A named ``preset`` must exist (one-line error listing them); without one, the experts'
        dataset's own distill preset if there is one, else the recipe defaults (logged).
    """
    from cvdd.config import apply_overrides
    from cvdd.evaluation.student import EvalConfig
    from cvdd.pipeline import distill_presets, get_distill_preset

    chosen = None
    if preset is not None:
        chosen = get_distill_preset(preset)  # raises the one-line error listing the presets
    else:
        presets = distill_presets()
        chosen = presets.get(pool[0].spec.default_preset)
        if chosen is None:
            log.info(
                "%s: no distill preset for %s; the evaluation recipe defaults apply (see `cvdd presets`)",
                where,
                pool[0].spec.name,
            )
    cfg = chosen.evaluate if chosen is not None else EvalConfig()
    return apply_overrides(cfg, overrides or {}, f"{where} options").validate(), chosen


def evaluate(
    synthetic: str | os.PathLike[str],
    experts: str | os.PathLike[str] = "runs/experts",
    *,
    ipc: int | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    label_dir: str | os.PathLike[str] | None = None,
    dataset: str | os.PathLike[str] | RealDataset | None = None,
    data: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    checkpoints: str | os.PathLike[str] | None = None,
) -> Any:
    """Train students on a synthetic set (or ``"random-real"``) and report real test top-1 (``cvdd evaluate``).

    Args:
        synthetic: a recover output (folder or ``synthetic.safetensors``) or ``"random-real"``.
        experts: folder of experts (the teacher and the dataset they were trained on).
        ipc: images per class for ``random-real``.
        preset: distill preset whose evaluation recipe is used (default: the dataset's own).
        overrides: :class:`~cvdd.evaluation.student.EvalConfig` fields (``label_mode``, ``seeds``, ``student``...).
        label_dir: folder for stored labels (stored mode; default ``<synthetic folder>/labels``).
        dataset, data, cache_dir: the real data (default: the dataset the experts were squeezed on).
        seed: seed of the random-real draw.
        device: where to train.
        progress: progress bars.
        checkpoints: folder for each student's epoch checkpoint (a killed evaluation resumes there; written at
            most every ``checkpoint_every_s`` seconds and after the last epoch).

    Returns:
        An :class:`~cvdd.evaluation.student.EvalResult`.
    """
    from cvdd.evaluation.student import evaluate_synthetic

    pool = load_pool(experts, device=device)
    cfg, _ = _eval_recipe(preset, pool, overrides, "evaluate")
    images, labels, real = _synthetic_or_random(synthetic, pool, ipc, dataset, data, cache_dir, seed, progress)
    if cfg.label_mode == "stored" and label_dir is None:
        label_dir = _default_label_dir(synthetic, ipc)
    teacher = None if cfg.label_mode == "hard" else build_teacher(pool, cfg)
    return evaluate_synthetic(
        images,
        labels,
        real.spec,
        real.test,
        cfg,
        teacher=teacher,
        label_dir=label_dir,
        device=device,
        progress=progress,
        checkpoint_dir=checkpoints,
    )


def ablate(
    dataset: str | os.PathLike[str] | RealDataset | None,
    experts: str | os.PathLike[str],
    out: str | os.PathLike[str] = "runs/ablate",
    *,
    data: str | os.PathLike[str] | None = None,
    grid: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    ipc: int = 10,
    seeds: list[int] | None = None,
    val_per_class: int = 100,
    only: list[str] | None = None,
    final: list[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compare configurations on a validation split carved from the training set (``cvdd ablate``).

    See :func:`cvdd.ablation.run_ablation`; ``only`` restricts the grid, ``final`` evaluates the named
    configurations once on the test split. Returns the table rows.

    ``dataset`` None: the one the experts were squeezed on. ``grid`` and ``preset`` None: ``digits`` for the
    embedded digits, else ``cifar10-cpu`` (the CPU-sized recipe).
    """
    from cvdd.ablation import load_grid, run_ablation, with_baselines
    from cvdd.experts import read_expert_meta

    if dataset is None:
        dataset, data = _source_or_experts(None, read_expert_meta(_found_experts(experts)[0]), data)
    real = _real(dataset, data, cache_dir, download, progress)
    default = "digits" if real.spec.name == "digits" else "cifar10-cpu"
    configs = load_grid(grid or default)
    preset = preset or default
    if only:
        unknown = sorted(set(only) - {c.name for c in configs})
        if unknown:
            raise ConfigError(f"--only names unknown configurations: {', '.join(unknown)}")
        configs = with_baselines(configs, only)
    return run_ablation(
        real,
        experts,
        configs,
        out,
        ipc=ipc,
        preset=preset,
        seeds=seeds,
        val_per_class=val_per_class,
        final=final,
        seed=seed,
        device=device,
        progress=progress,
    )


def report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write the HTML and Markdown report of a distill run (``cvdd report``); returns the paths written.

    >>> paths = cvdd.report("runs/demo")  # doctest: +SKIP
    >>> paths["html"]  # doctest: +SKIP
    PosixPath('runs/demo/report/report.html')
    """
    from cvdd.reporting import write_report

    return write_report(run_dir, out)


def relabel(
    synthetic: str | os.PathLike[str],
    experts: str | os.PathLike[str] = "runs/experts",
    out: str | os.PathLike[str] | None = None,
    *,
    ipc: int | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    dataset: str | os.PathLike[str] | RealDataset | None = None,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    label_seed: int | None = None,
    device: str | None = None,
    progress: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Store per-epoch soft labels (BSSL teacher) for a synthetic set (``cvdd relabel``); returns their description.

    The epochs, batch and micro-batch sizes come from the evaluation recipe (they must match the student's), and
    so does the plans' seed by default: ``label_seed`` None is the recipe's first student seed, the seed whose
    plans ``evaluate`` replays from stored labels. ``restart`` discards labels in ``out`` made for another set,
    teacher or settings instead of refusing them.
    """
    from cvdd.device import resolve_device
    from cvdd.evaluation.student import configure_teacher
    from cvdd.labels.stored import relabel_stored

    pool = load_pool(experts, device=device)
    cfg, _ = _eval_recipe(preset, pool, {**(overrides or {}), "label_mode": "stored"}, "relabel")
    images, labels, real = _synthetic_or_random(synthetic, pool, ipc, dataset, data, cache_dir, seed, progress)
    if out is None:
        out = _default_label_dir(synthetic, ipc)
    dev = resolve_device(device)
    teacher = build_teacher(pool, cfg)
    configure_teacher(teacher, cfg, dev)
    return relabel_stored(
        images.to(dev),
        labels.to(dev),
        real.spec,
        teacher,
        cfg.label_settings(cfg.seeds[0] if label_seed is None else label_seed),
        out,
        progress=progress,
        restart=restart,
    )


def _default_label_dir(synthetic: str | os.PathLike[str], ipc: int | None) -> Path:
    """Where relabel writes and evaluate reads stored labels by default: ``labels/`` beside the synthetic set, or
    ``runs/random-real-ipc<N>/labels`` for ``random-real`` (the same place for both commands)."""
    if os.fspath(synthetic) == "random-real":
        return Path("runs") / f"random-real-ipc{ipc}" / "labels"
    base = Path(synthetic)
    folder = base if base.is_dir() else base.parent
    # An image folder of a dataset with a class named "labels" holds that class there: the labels go to a hidden
    # folder instead, which the folder reader skips (written into the class, they would hide it from the reader).
    taken = folder / "labels"
    if taken.is_dir() and not (taken / "labels.json").is_file() and any(taken.iterdir()):
        return folder / ".labels"
    return taken


def distill(
    dataset: str | os.PathLike[str] | RealDataset = "digits",
    out: str | os.PathLike[str] = "runs/distill",
    *,
    data: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    methods: list[str] | None = None,
    ipcs: list[int] | None = None,
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
    recover_overrides: dict[str, Any] | None = None,
    squeeze_overrides: dict[str, Any] | None = None,
    experts: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    progress: bool = True,
    restart: bool = False,
) -> list[dict[str, Any]]:
    """The whole pipeline for several methods and IPCs (``cvdd distill``); writes results.json and results.md.

    Args:
        dataset: dataset name or path (default: the embedded digits).
        out: run folder.
        preset: distill preset (default: the dataset's own, e.g. ``digits``).
        methods: subset of ``random-real``, ``sre2l++``, ``cvdd``.
        ipcs: images per class to distil.
        seeds: student seeds.
        overrides: evaluation recipe fields (``epochs``, ``student``, ``label_mode``...).
        recover_overrides: recover fields applied to every synthesised set (``iterations``, ``lr``...); not ``ipc``
            or ``committee_size``, which the pipeline sets per method and IPC (a ConfigError).
        squeeze_overrides: squeeze recipe fields for the experts trained here (``epochs``...).
        experts: reuse experts from this folder (default: ``<out>/experts``, trained if missing).
        seed: run seed (squeeze, recover, random-real draw).
        restart: discard recover units and stored labels in ``out`` made with another configuration (after
            ``cvdd prior`` or a changed ``recover_overrides``) instead of refusing them; finished work that still
            matches is kept.

    Returns:
        The rows of ``results.json``.
    """
    from cvdd.config import apply_overrides
    from cvdd.pipeline import DistillPreset, check_settings, get_distill_preset
    from cvdd.pipeline import distill as run_distill

    def choose(name: str) -> DistillPreset:
        chosen = get_distill_preset(name)
        evaluate_over = dict(overrides or {})
        if seeds is not None:
            evaluate_over["seeds"] = seeds
        chosen.evaluate = apply_overrides(chosen.evaluate, evaluate_over, "evaluate options").validate()
        if methods is not None:
            chosen.methods = list(methods)
        if ipcs is not None:
            chosen.ipcs = list(ipcs)
        check_settings(chosen, recover_overrides, squeeze_overrides)
        return chosen

    if preset is None:
        preset = _own_distill_preset(dataset)
    # The preset is checked with every override before the dataset is read (a decode can take minutes).
    chosen = choose(preset)
    real = _real(dataset, data, cache_dir, download, progress)
    return run_distill(
        real,
        out,
        chosen,
        experts_dir=experts,
        seed=seed,
        device=device,
        progress=progress,
        recover_overrides=recover_overrides,
        squeeze_overrides=squeeze_overrides,
        restart=restart,
    )


def _own_distill_preset(dataset: str | os.PathLike[str] | RealDataset) -> str:
    """The distill preset a dataset runs without ``--preset`` (digits: ``digits``), known before it is read.

    Raises:
        ConfigError: the dataset has no preset of its own (CIFAR-10 has a CPU and several paper GPU presets,
            a folder of images none): the user chooses.
    """
    from cvdd.data.specs import canonical_name, known_constants
    from cvdd.pipeline import distill_presets

    if isinstance(dataset, RealDataset):
        name, own = dataset.spec.name, dataset.spec.default_preset
    else:
        name = os.fspath(dataset)
        own = known_constants(name)["default_preset"] if canonical_name(name) else None
        if own is None and not os.path.exists(name):  # the first problem to name: a mistyped path or name
            from cvdd.data.sources import missing_dataset_error

            raise missing_dataset_error(name)
    if own not in distill_presets():
        listing = " ".join(["cvdd presets", canonical_name(name) or ""]).strip()
        raise ConfigError(
            f"cvdd distill needs --preset for {name}: it has no preset of its own; `{listing}` lists them "
            "(cifar10-cpu runs on a CPU, the paper's <dataset>-ipc<N> presets are GPU jobs)"
        )
    return str(own)


def prior(
    experts: str | os.PathLike[str] = "runs/experts",
    *,
    ipc: int = 1,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    recover_overrides: dict[str, Any] | None = None,
    val_per_class: int = 100,
    dataset: str | os.PathLike[str] | RealDataset | None = None,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """Measure each expert's voting prior and write it into its metadata (``cvdd prior``).

    The paper's prior of an expert is the accuracy of a student trained on data recovered by that expert alone.
    Here: SRe2L++ (N = 1) recovery with the expert at a small IPC, soft labels from the same teacher for every
    expert (the committee), and the student's top-1 on a class-balanced split of real *training* images
    (``val_per_class`` per class), never on the test set, so the voting weights are not tuned on it.

    Returns:
        Expert name -> prior in percent.
    """
    import json as _json
    import shutil
    import tempfile

    from cvdd.ablation import carve_validation
    from cvdd.artifacts import atomic_write_text
    from cvdd.config import refuse_owned
    from cvdd.evaluation.student import evaluate_synthetic
    from cvdd.experts import expert_paths

    owned = {
        "ipc": "its ipc argument",
        "committee_size": "the method (N = 1: each expert alone)",
        "single": "the expert being measured",
    }
    refuse_owned(recover_overrides, owned, "prior recover option", "prior")  # before any work
    pool = load_pool(experts, device=device)
    cfg, chosen = _eval_recipe(preset, pool, overrides, "prior")
    source, where = _source_or_experts(dataset, pool[0].meta, data)
    real = (
        source
        if isinstance(source, RealDataset)
        else load_dataset(source, data=where, cache_dir=cache_dir, progress=progress)
    )
    if not isinstance(real.train, TensorSplit):
        raise ConfigError("cvdd prior needs an in-memory dataset (images of at most 64 px)")
    # The scoring images are carved out of the pool that recover initialises from (real images, patches): a
    # student scored on the very images its set started from would overrate that expert. Half a class at most.
    per_class = max(1, min(val_per_class, _smallest_class(real) // 2))
    carved = carve_validation(real, per_class, seed)
    val = carved.test
    # The committee teacher weighs its experts equally here: weights from the priors being measured would make
    # each measurement depend on the previous one (and, before any, on each expert's own training accuracy).
    teacher = build_teacher(pool, cfg, equal=True)
    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="cvdd-prior-"))
    try:
        priors = {}
        for expert in pool:
            res = recover(
                [Path(expert_paths(Path(experts), expert.name)[0])],
                work / expert.name,
                ipc=ipc,
                committee_size=1,
                dataset=carved,
                seed=seed,
                device=device,
                progress=progress,
                # the preset's recover settings (a CPU preset's 300 small steps, not the paper's 4000 on a GPU)
                preset=chosen.recover_preset if chosen is not None else None,
                # the expert measured, whatever expert a paper preset names for SRe2L++ (`single: resnet18`)
                overrides={**(recover_overrides or {}), "single": expert.name},
            )
            ev = evaluate_synthetic(
                res.images,
                res.labels,
                real.spec,
                val,
                cfg,
                teacher=teacher,
                label_dir=work / expert.name / "labels",  # stored-label recipes (cifar10-cpu, the paper's)
                device=device,
                progress=progress,
            )
            priors[expert.name] = 100.0 * ev.mean
            meta_path = expert_paths(Path(experts), expert.name)[1]
            meta = _json.loads(meta_path.read_text())
            meta["prior"] = priors[expert.name]
            meta["prior_recipe"] = {
                "ipc": ipc,
                "student": cfg.student,
                "epochs": cfg.epochs,
                "seeds": cfg.seeds,
                "label_mode": cfg.label_mode,
                "teacher": teacher.describe(),
                "validation": f"{per_class} real training images per class, carved out of the init pool",
                "seed": seed,
                "recover_overrides": dict(recover_overrides or {}),
            }
            atomic_write_text(meta_path, _json.dumps(meta, indent=1))
    finally:
        if out is None:  # the recovered sets only served the measurement
            shutil.rmtree(work, ignore_errors=True)
    return priors


def _smallest_class(real: RealDataset) -> int:
    """Smallest number of training images of any class."""
    import torch

    return int(torch.bincount(real.train.labels.cpu(), minlength=real.spec.num_classes).min())


def info(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe any cvdd artifact (``cvdd info``): an expert, a synthetic set, stored labels, a distill run, or an
    exported set (``.npz``, ``.safetensors``, an image folder).

    Returns:
        A flat dict: ``kind`` plus the fields that matter for that kind (dataset, classes, IPC, committee...).
    """
    import json as _json

    from cvdd.errors import ArtifactError

    p = Path(artifact)
    if p.is_file() and (p.suffix == ".npz" or (p.suffix == ".safetensors" and not p.with_suffix(".json").is_file())):
        from cvdd.data.external import describe_external_set

        return describe_external_set(p)  # a `cvdd export` file
    candidates = (
        [p.with_suffix(".json")]
        if p.suffix in (".safetensors", ".json")
        else [
            p / "synthetic.json",
            p / "recover.json",
            p / "labels.json",
            p / "results.json",
            p / "labels" / "labels.json",
        ]
    )
    if p.is_dir() and not any(c.is_file() for c in candidates[:-1]):
        experts_found = [
            m for m in sorted(p.glob("*.json")) if '"kind": "expert"' in m.read_text(errors="replace")[:200]
        ]
        if experts_found:
            return {"kind": "experts folder", "path": str(p), "experts": [m.stem for m in experts_found]}
        from cvdd.data.external import describe_external_set

        # An exported or the user's image folder (its labels/, when evaluated with stored labels, is not a class),
        # else the labels/ of a folder that holds only them (random-real's), else a one-line error.
        try:
            return describe_external_set(p)
        except DataError:
            if not candidates[-1].is_file():
                raise
    meta_path = next((c for c in candidates if c.is_file()), None)
    if meta_path is None:
        raise ArtifactError(f"no cvdd artifact found at {p}")
    try:
        meta = _json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: also UnicodeDecodeError
        raise ArtifactError(f"unreadable metadata {meta_path}: {str(exc).splitlines()[0]}") from None
    try:
        return _describe(meta_path, meta)
    except (KeyError, TypeError, AttributeError, IndexError):
        raise ArtifactError(f"{meta_path} is not cvdd metadata (fields missing or of another type)") from None


def _describe(meta_path: Path, meta: Any) -> dict[str, Any]:
    """The ``info`` fields of one artifact's parsed metadata (KeyError/TypeError when it is not cvdd's)."""
    if meta_path.name == "results.json":
        return {
            "kind": "distill results",
            "path": str(meta_path),
            "rows": len(meta),
            "methods": sorted({r["method"] for r in meta}),
            "ipcs": sorted({r["ipc"] for r in meta}),
            "dataset": meta[0]["dataset"] if meta else None,
        }
    if meta_path.name == "labels.json":
        ident = meta["ident"]
        return {
            "kind": "stored labels",
            "path": str(meta_path.parent),
            "complete": meta.get("complete"),
            "epochs": ident["settings"]["epochs"],
            "batch_size": ident["settings"]["batch_size"],
            "micro_batch": ident["settings"]["micro_batch"],
            "teacher": ident["teacher"]["experts"],
            "bssl": ident["teacher"]["bssl"],
            "bytes": meta.get("bytes"),
            "images": ident["n"],
        }
    kind = meta.get("kind")
    spec = meta.get("dataset", {})
    out: dict[str, Any] = {
        "kind": kind,
        "path": str(meta_path),
        "dataset": spec.get("name"),
        "classes": len(spec.get("classes", [])),
        "image_size": spec.get("image_size"),
        "cvdd_version": meta.get("cvdd_version"),
    }
    if kind == "expert":
        out.update(
            {
                "arch": meta.get("arch"),
                "test_acc": meta.get("test_acc"),
                "prior": meta.get("prior"),
                "epochs": meta.get("epochs"),
                "seed": meta.get("seed"),
                "params": meta.get("params"),
            }
        )
    elif kind == "synthetic":
        out.update(
            {
                "method": meta.get("method"),
                "ipc": meta.get("ipc"),
                "seed": meta.get("seed"),
                "committee_policy": meta.get("committee_policy"),
                "committees": meta.get("committees"),
                "config_hash": meta.get("config_hash"),
            }
        )
    elif kind == "recover-manifest":  # a recover run whose units are not assembled yet (shards, or killed)
        from cvdd.synthesis.recover import _unit_state, manifest_units

        units = manifest_units(meta, meta_path)
        done = sum(_unit_state(meta_path.parent, u, meta["config_hash"]) == "done" for u in units)
        out.update(
            {
                "kind": "recover run (not assembled)",
                "method": meta.get("method"),
                "ipc": meta.get("ipc"),
                "units_done": f"{done} of {len(units)}",
                "config_hash": meta.get("config_hash"),
            }
        )
    return out
