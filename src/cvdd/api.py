"""The Python API: one function per CLI subcommand, with the same names and options.

>>> import cvdd
>>> results = cvdd.squeeze("digits", archs=["convnet_d3_w32"], out="runs/experts", epochs=2)
"""

from __future__ import annotations

import os
from typing import Any

from cvdd.data.sources import RealDataset
from cvdd.data.sources import load_dataset as _load_dataset
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
