"""``cvdd squeeze``: train the committee of expert classifiers on the real data."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cvdd import distributed as dd
from cvdd.artifacts import base_metadata, verify_checksum
from cvdd.config import Recipe, SqueezePreset, apply_overrides, get_squeeze_preset
from cvdd.data.sources import RealDataset
from cvdd.data.specs import DatasetSpec
from cvdd.device import derive_seed, resolve_device
from cvdd.engine import fit
from cvdd.errors import ArtifactError, ConfigError
from cvdd.experts import EXPERT_KIND, expert_paths, read_expert_meta, save_expert
from cvdd.models import count_parameters, create_model, model_info

log = logging.getLogger(__name__)


@dataclass
class SqueezeResult:
    """One expert produced (or found already finished) by squeeze.

    Attributes:
        name: expert name (file stem).
        arch: architecture.
        path: path of the ``.safetensors`` weights.
        test_acc: top-1 on the real test split (fraction).
        seconds: training wall time (of the run that produced it).
        images_per_s: training throughput.
        skipped: True when a finished expert with the same recipe was found and reused.
    """

    name: str
    arch: str
    path: Path
    test_acc: float
    seconds: float
    images_per_s: float
    skipped: bool = False


def resolve_squeeze_config(
    data: RealDataset,
    archs: list[str] | None,
    preset: str | None,
    epochs: int | None,
    overrides: dict[str, Any] | None,
) -> tuple[SqueezePreset, list[str], Recipe]:
    """Merge preset, explicit architectures and recipe overrides; validate everything up front."""
    preset_name = preset or data.spec.default_preset
    chosen = get_squeeze_preset(preset_name)
    recipe_over = dict(overrides or {})
    if epochs is not None:
        recipe_over["epochs"] = epochs
    recipe = apply_overrides(chosen.recipe, recipe_over, f"squeeze preset '{preset_name}' recipe").validate()
    # The registry's own spelling (`ResNet18` -> `resnet18`): the name keys the file, the seed and the student match.
    arch_list = [model_info(a).name for a in (archs or chosen.archs)]
    if not arch_list:
        raise ConfigError("no architectures given (use --arch NAME [NAME ...])")
    if len(set(arch_list)) != len(arch_list):
        raise ConfigError(f"an architecture is listed twice: {arch_list}")
    for arch in arch_list:  # fail on an unknown name before any training starts
        create_model(arch, data.spec.num_classes, data.spec.image_size)
    return chosen, arch_list, recipe


def _weights_intact(weights: Path, meta: dict[str, Any]) -> bool:
    """Whether an expert's weight file is the one its metadata recorded (sha256)."""
    try:
        verify_checksum(weights, meta)
    except ArtifactError:
        return False
    return True


def _same_training(saved: Any, recipe: dict[str, Any]) -> bool:
    """Whether an expert's recorded recipe trains the same weights as ``recipe``.

    ``eval_every`` (how often the test split is scored) is left out: scoring runs in eval mode, a streamed test
    split's loader draws from its own generator, and the global RNG is seeded again at each epoch's start, so no
    draw of training depends on it (tests/engine/test_loop.py checks the weights bit-identical on an in-memory
    split); a user who turns it on to watch a run does not retrain finished experts. A resume checkpoint still
    counts it (``recipe_hash``). ``workers`` stays: with a streamed dataset
    the workers' random crops depend on how many there are.
    """
    if not isinstance(saved, dict):
        return False
    return {k: v for k, v in saved.items() if k != "eval_every"} == {
        k: v for k, v in recipe.items() if k != "eval_every"
    }


def squeeze_experts(
    data: RealDataset,
    archs: list[str],
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    preset_name: str,
    seed: int = 0,
    device: str | torch.device | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[SqueezeResult]:
    """Train one expert per architecture on ``data`` and store it in ``out``.

    A finished expert with the same dataset, recipe and seed is reused unless ``force``; an expert file made
    differently is never overwritten without ``force``. A killed run resumes each expert from its last
    epoch checkpoint (``out/.checkpoints/<arch>.pt``).
    """
    dev = resolve_device(device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    recipe_dict = recipe.identity()
    for arch in archs:
        weights, meta_path = expert_paths(out_dir, arch)
        if meta_path.is_file() and weights.is_file() and not force:
            meta = read_expert_meta(meta_path)
            made_for = meta.get("dataset")
            same = (
                meta.get("dataset_fingerprint") == data.fingerprint
                and made_for is not None
                and DatasetSpec.from_dict(made_for).input_key() == data.spec.input_key()
                and _same_training(meta.get("recipe"), recipe_dict)
                and meta.get("seed") == seed
                and meta.get("arch") == arch
            )
            if same and not _weights_intact(weights, meta):
                # weights of a --force rewrite killed before its metadata: train again (resuming its checkpoint)
                log.warning("%s: the weights do not match their metadata's checksum; training it again", arch)
            elif same:
                log.info(
                    "%s: already trained (test top-1 %.2f%%), skipping; use --force to retrain",
                    arch,
                    100 * meta["test_acc"],
                )
                results.append(
                    SqueezeResult(
                        arch,
                        arch,
                        weights,
                        float(meta["test_acc"]),
                        float(meta.get("wall_seconds", 0.0)),
                        float(meta.get("images_per_s", 0.0)),
                        skipped=True,
                    )
                )
                continue
            else:
                raise ArtifactError(
                    f"{meta_path} holds an expert made with another dataset, image size, normalisation, recipe or "
                    f"seed; pass --force to replace it or choose another --out"
                )
        arch_seed = derive_seed(seed, "squeeze", arch)
        torch.manual_seed(arch_seed)  # the model's initial weights
        model = create_model(arch, data.spec.num_classes, data.spec.image_size)
        ckpt = out_dir / ".checkpoints" / f"{arch}.pt"
        t0 = time.perf_counter()
        result = fit(
            model,
            data.train,
            data.test,
            recipe,
            spec=data.spec,
            device=dev,
            seed=arch_seed,
            checkpoint=ckpt,
            progress=progress,
            desc=f"squeeze {arch}",
            identity={"arch": arch, "dataset": data.fingerprint, "input": data.spec.input_key()},
        )
        wall = time.perf_counter() - t0
        meta = base_metadata(EXPERT_KIND, data.spec)
        meta.update(
            {
                "name": arch,
                "arch": arch,
                "test_acc": result.test_acc,
                "train_acc": result.history[-1]["train_acc"] if result.history else None,
                "epochs": recipe.epochs,
                "recipe": recipe_dict,
                "preset": preset_name,
                "seed": seed,
                # absolute: later stages started from another folder find it too
                "dataset_source": data.source
                if data.source == "digits" or not os.path.exists(data.source)
                else os.path.abspath(data.source),
                "dataset_fingerprint": data.fingerprint,
                "params": count_parameters(model),
                "wall_seconds": wall,
                "train_seconds": sum(h["seconds"] for h in result.history),
                "images_per_s": result.images_per_s or _history_throughput(result.history),
                "device": str(dev),
                "resumed_from_epoch": result.resumed_from,
                "history": result.history,
                "prior": None,
            }
        )
        model.cpu()
        path = expert_paths(out_dir, arch)[0]
        if dd.is_main():  # one writer: the ranks' files would otherwise race (and their JSON vouch for another's)
            path = save_expert(out_dir, arch, model, meta)
            ckpt.unlink(missing_ok=True)
        dd.barrier()  # no rank reads the expert (next stage, reuse) before it is complete
        log.info("%s: test top-1 %.2f%% in %.1f s -> %s", arch, 100 * result.test_acc, wall, path)
        results.append(SqueezeResult(arch, arch, path, result.test_acc, wall, meta["images_per_s"]))
    return results


def _history_throughput(history: list[dict[str, Any]]) -> float:
    """Training images/s over the epochs of ``history`` (a run resumed after its last epoch trains none itself)."""
    seconds = sum(h["seconds"] for h in history)
    return sum(h["images_per_s"] * h["seconds"] for h in history) / seconds if seconds > 0 else 0.0
