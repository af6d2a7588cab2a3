"""Expert checkpoints: safetensors weights plus JSON metadata, and their validated loading.

An expert is stored as ``<dir>/<name>.safetensors`` and ``<dir>/<name>.json``. The metadata records the
architecture, the dataset spec (classes in label order, image size, normalisation), the test accuracy, the
recipe, the seed, the package version and the wall time; later stages read the prior from it rather than
from numbers typed by hand.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvdd.artifacts import check_kind, load_tensors, save_tensors
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ArtifactError, ModelError

EXPERT_KIND = "expert"

log = logging.getLogger(__name__)


@dataclass
class Expert:
    """A loaded expert.

    Attributes:
        name: file stem (usually the architecture name).
        arch: registered architecture.
        model: the network, on the requested device, in eval mode.
        meta: the full metadata dict.
        spec: dataset spec it was trained on.
    """

    name: str
    arch: str
    model: nn.Module
    meta: dict[str, Any]
    spec: DatasetSpec

    @property
    def test_acc(self) -> float:
        return float(self.meta.get("test_acc", float("nan")))

    @property
    def prior(self) -> tuple[float, str]:
        """The voting prior in percent and where it comes from.

        ``prior`` when ``cvdd prior`` measured it (on a split of training images), else ``train_acc``: the expert's
        accuracy on its augmented training batches in the last squeeze epoch. Never the test accuracy: the
        committee's weights would then be chosen by looking at the test set. ``none`` (nan) for metadata without
        either; :func:`pool_priors` then gives the pool equal priors.
        """
        prior = self.meta.get("prior")
        if isinstance(prior, (int, float)) and math.isfinite(prior):
            return float(prior), "prior"
        train = self.meta.get("train_acc")
        if isinstance(train, (int, float)) and math.isfinite(train):
            return 100.0 * float(train), "train_acc"
        return float("nan"), "none"


def pool_priors(experts: list[Expert]) -> tuple[dict[str, float], dict[str, str]]:
    """Every expert's voting prior (percent) and its source (see :attr:`Expert.prior`), keyed by name.

    When any expert has neither a measured prior nor a training accuracy, or the pool mixes the two (a student's
    accuracy of 20-60% against an expert's own 80-99%: the unmeasured ones would take nearly all the weight),
    every expert gets the same prior (0, source ``equal``), with a warning for the mix.
    """
    found = {e.name: e.prior for e in experts}
    sources = {src for _, src in found.values()}
    if "none" in sources or {"prior", "train_acc"} <= sources:
        if "none" not in sources:
            log.warning(
                "`cvdd prior` measured %s but not %s: the committee votes with equal priors until it measures all",
                ", ".join(n for n, (_, s) in found.items() if s == "prior"),
                ", ".join(n for n, (_, s) in found.items() if s != "prior"),
            )
        return {n: 0.0 for n in found}, {n: "equal" for n in found}
    return {n: v for n, (v, _) in found.items()}, {n: src for n, (_, src) in found.items()}


def expert_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    base = Path(directory) / name
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def save_expert(directory: str | os.PathLike[str], name: str, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write an expert's weights and metadata atomically (the JSON last, marking it complete)."""
    weights, _ = expert_paths(directory, name)
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(weights, state, meta)
    return weights


def read_expert_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of an expert given its ``.json``, ``.safetensors`` or stem path."""
    p = Path(path)
    meta_path = p.with_suffix(".json")
    if not meta_path.is_file():
        raise ArtifactError(f"expert not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"unreadable expert metadata {meta_path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{meta_path} is not a cvdd expert (a JSON {type(meta).__name__}, not an object)")
    check_kind(meta, EXPERT_KIND, meta_path)
    return meta


def list_experts(directory: str | os.PathLike[str]) -> list[Path]:
    """Paths (``.safetensors``) of the complete experts in a folder, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"experts folder not found: {d}")
    out = []
    for meta_path in sorted(d.glob("*.json")):
        weights = meta_path.with_suffix(".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("kind") == EXPERT_KIND and weights.is_file():
            out.append(weights)
    return out


def load_expert(
    path: str | os.PathLike[str],
    spec: DatasetSpec | None = None,
    device: torch.device | str = "cpu",
) -> Expert:
    """Load an expert and check it fits ``spec``.

    Args:
        path: the expert's ``.safetensors`` (or ``.json``, or stem) path.
        spec: the dataset it will be used with; a different class count, class order, image size or
            normalisation is an :class:`ArtifactError` naming both datasets.
        device: where to put the model.

    Returns:
        The expert with its model in eval mode, parameters frozen.
    """
    from cvdd.models import create_model

    p = Path(path)
    weights = p.with_suffix(".safetensors")
    tensors, meta = load_tensors(weights)
    stored = check_kind(meta, EXPERT_KIND, weights)
    if spec is not None:
        try:
            spec.check_compatible(stored, f"expert {weights}")
        except Exception as exc:  # DataError -> ArtifactError: the checkpoint is the wrong one
            raise ArtifactError(str(exc)) from None
    arch = str(meta.get("arch"))
    try:
        model = create_model(arch, stored.num_classes, stored.image_size)
    except ModelError as exc:
        raise ArtifactError(f"expert {weights}: {exc}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # same names, other shapes: PyTorch's message is one line per tensor
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "tensor shapes differ")
        raise ArtifactError(f"expert {weights} does not match architecture '{arch}': {first}") from None
    if missing or unexpected:
        raise ArtifactError(
            f"expert {weights} does not match architecture '{arch}' "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return Expert(name=weights.stem, arch=arch, model=model, meta=meta, spec=stored)
