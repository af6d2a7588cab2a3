"""The Python API: one function per CLI subcommand, with the same names and options.

>>> import cvdd
>>> results = cvdd.squeeze("digits", archs=["convnet_d3_w32"], out="runs/experts", epochs=2)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cvdd.data.sources import RealDataset
from cvdd.data.sources import load_dataset as _load_dataset
from cvdd.distill.recover import RecoverResult, export_imagefolder, recover_images
from cvdd.errors import ConfigError, CvddError
from cvdd.experts import Expert
from cvdd.models import ModelInfo, count_parameters, create_model, forward_mflops, list_models, model_info
from cvdd.squeeze import SqueezeResult, resolve_squeeze_config, squeeze_experts


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
        preset: squeeze preset (default: the dataset's, e.g. ``digits``, ``cifar10``; ``cifar10-cpu`` for CPUs).
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
    real = (
        dataset
        if isinstance(dataset, RealDataset)
        else load_dataset(dataset, data=data, cache_dir=cache_dir, download=download, progress=progress)
    )
    chosen, arch_list, recipe = resolve_squeeze_config(real, archs, preset, epochs, overrides)
    del chosen
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


def _dataset_for_experts(source: str | None) -> str | None:
    """The dataset an expert was squeezed on, as ``load_dataset`` accepts it (None if it is gone)."""
    if not source:
        return None
    if source.startswith("torchvision:"):
        return source.split(":", 1)[1]
    if source == "digits" or os.path.exists(source):
        return source
    return None


def load_pool(
    experts: str | os.PathLike[str] | list[str | os.PathLike[str]],
    pool: list[str] | None = None,
    device: str | None = None,
) -> list[Expert]:
    """Load the experts of a folder (or a list of expert files), optionally only/ordered by ``pool`` names."""
    from cvdd.device import resolve_device
    from cvdd.errors import ArtifactError
    from cvdd.experts import list_experts, load_expert

    paths = list_experts(experts) if isinstance(experts, str | os.PathLike) else [Path(p) for p in experts]
    if not paths:
        raise ArtifactError(f"no experts found in {experts} (run `cvdd squeeze` first)")
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
) -> RecoverResult:
    """Synthesise IPC images per class with a voting committee of experts (``cvdd recover``).

    Args:
        experts: folder of squeezed experts, or a list of expert files; they form the pool.
        out: output folder (``synthetic.safetensors`` + ``.json``, ``grid.png``, ``units/``).
        ipc, committee_size, committee, voting, iterations, lr, init: the most used
            :class:`~cvdd.distill.recover.RecoverConfig` fields (None keeps the preset's value).
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

    Returns:
        The :class:`~cvdd.distill.recover.RecoverResult`.
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
    cfg = apply_overrides(cfg, merged, "recover options").validate(len(loaded))
    real: RealDataset | None = None
    if cfg.init in ("patches", "real"):
        if isinstance(dataset, RealDataset):
            real = dataset
        else:
            source = dataset if dataset is not None else _dataset_for_experts(loaded[0].meta.get("dataset_source"))
            if source is None:
                raise ConfigError(
                    f"the experts' dataset ({loaded[0].meta.get('dataset_source')}) is not available; give --dataset"
                )
            real = load_dataset(source, data=data, cache_dir=cache_dir, progress=progress)
    return recover_images(loaded, cfg, out, data=real, seed=seed, device=device, progress=progress, restart=restart)


def export(synthetic: str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "png") -> int:
    """Write a synthetic set as an ImageFolder of PNG (or JPEG q75) files (``cvdd export``); returns the count."""
    return export_imagefolder(synthetic, out, format)
