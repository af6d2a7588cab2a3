"""Stored soft labels: one file per epoch with the epoch's augmentation plan and the teacher's logits.

``labels/epoch_0000.safetensors`` holds the plan (order, crop boxes, flips, CutMix permutation and boxes) and
the logits of every position, fp16 by default (or the top-k values and indices). ``labels/labels.json``
describes the teacher, the batch and micro-batch sizes, the seed, and the bytes stored. Finished epochs are
skipped on a re-run, so a killed relabel resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cvdd import distributed as dd
from cvdd.artifacts import (
    atomic_write_text,
    build_stamp,
    distinct_builds,
    fsync_file,
    other_builds,
    pixel_digest,
    read_json_object,
    temp_sibling,
)
from cvdd.data.augment import Normalize
from cvdd.data.specs import DatasetSpec
from cvdd.device import derive_seed, make_generator
from cvdd.errors import ArtifactError
from cvdd.labels.bssl import Teacher
from cvdd.labels.plans import EpochPlan, apply_plan, make_plan

log = logging.getLogger(__name__)


@dataclass
class LabelSettings:
    """How soft labels are produced (must match the student's batch layout)."""

    epochs: int
    batch_size: int
    micro_batch: int
    seed: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    cutmix: bool = True
    dtype: str = "fp16"
    topk: int = 0

    def key(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "micro_batch": self.micro_batch,
            "seed": self.seed,
            "crop_scale": list(self.crop_scale),
            "cutmix": self.cutmix,
            "dtype": self.dtype,
            "topk": self.topk,
        }


def plan_for_epoch(settings: LabelSettings, n: int, image_size: int, epoch: int, device: torch.device) -> EpochPlan:
    """The plan of epoch ``epoch``: drawn from a generator derived from (seed, epoch), as the online mode does."""
    gen = make_generator(derive_seed(settings.seed, "epoch", epoch), device)
    return make_plan(n, settings.batch_size, image_size, gen, settings.crop_scale, settings.cutmix)


# Input pixels per teacher forward when relabelling (4,096 images of 32 px, 83 of 224 px): enough to fill a GPU
# with the batches of an epoch, small enough that a 224 px ResNet-50's largest activation stays near 1 GB (fp32).
TEACHER_PIXELS = 2**22


def teacher_logits(
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: EpochPlan,
    teacher: Teacher,
    normalize: Normalize,
    micro_batch: int,
    fuse: bool | None = None,
) -> torch.Tensor:
    """Teacher logits (N, C) of every position of an epoch, each micro-batch labelled with its own BN stats.

    Args:
        images, labels: the set, (N, 3, S, S) and (N,).
        plan: the epoch's augmentation plan.
        teacher: the (BSSL) teacher.
        normalize: the dataset's normalisation.
        micro_batch: the student's micro-batch, the teacher's BN group (0: each whole batch is one group).
        fuse: run several batches as one teacher forward whose BN layers compute every micro-batch's statistics
            at once (:meth:`Teacher.__call__` with ``group``), up to :data:`TEACHER_PIXELS` input pixels, when
            the batch size is a multiple of the micro-batch (the groups then line up). Default: on CUDA only. On
            a GPU a relabel epoch is bound by kernel launches, and fusing cuts the working operators of a 100-image
            epoch 3.6x with the paper's five experts (``bench/bench_relabel.py``); on a 2-core CPU it took
            1.2-1.4x the time (the grouped statistics are a slower reduction there than the per-group BN kernel),
            and one forward per micro-batch keeps stored labels bit-identical to an online teacher's.
    """
    fuse = images.device.type == "cuda" if fuse is None else fuse
    steps = [apply_plan(images, labels, plan, step, normalize)[0] for step in range(plan.num_batches)]
    if micro_batch <= 0:
        return torch.cat([teacher(x, group=0) for x in steps])
    if not fuse or plan.batch_size % micro_batch:
        return torch.cat([teacher(m, group=0) for x in steps for m in x.split(micro_batch)])
    per_chunk = max(1, TEACHER_PIXELS // (plan.batch_size * images.shape[-1] * images.shape[-2]))
    return torch.cat(
        [teacher(torch.cat(steps[i : i + per_chunk]), group=micro_batch) for i in range(0, len(steps), per_chunk)]
    )


def relabel_stored(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: DatasetSpec,
    teacher: Teacher,
    settings: LabelSettings,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Write per-epoch label shards for a synthetic set; return the description written to ``labels.json``.

    A folder that already holds labels of this set, teacher and settings is completed (finished epochs are kept).
    One that holds labels made for anything else is refused, or with ``restart`` emptied of its epochs first.
    """
    from tqdm import tqdm

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "labels.json"
    # What the labels depend on: the settings, the teacher (its experts' weight files included) and the very set:
    # a folder of labels of other pixels (a set recovered again, another draw of random real images) is refused.
    ident = {
        "settings": settings.key(),
        "teacher": teacher.describe(),
        "n": len(labels),
        "classes": list(spec.classes),
        "data": pixel_digest(images, labels)[:16],
    }
    reused: list[dict[str, str] | None] = []  # the builds that made the epochs already on disk
    keys: list[str] = []  # what differs from the labels already in the folder
    if meta_path.is_file():
        try:
            keys = _differing(read_json_object(meta_path, "label description").get("ident") or {}, ident)
        except ArtifactError:
            keys = ["unreadable"]
        if keys and not restart:
            what = {"settings": "label settings (seed, epochs, crops, CutMix...)", "teacher": "teacher"}
            differ = sorted({what.get(k, "synthetic set") for k in keys})
            held = (
                "an unreadable labels.json"
                if keys == ["unreadable"]
                else f"labels made for another {' and '.join(differ)}"
            )
            raise ArtifactError(
                f"{out_dir} holds {held}; choose another folder, remove that one, or relabel it there with "
                "`cvdd relabel ... --out DIR --restart` (in a distill run: `cvdd distill --restart`)"
            )
    if meta_path.is_file() and not keys:
        reused = [
            _shard_build(p) for e in range(settings.epochs) if (p := out_dir / f"epoch_{e:04d}.safetensors").is_file()
        ]
        mixed = other_builds(f"stored label epochs in {out_dir}", reused)
        if mixed and dd.is_main():
            log.warning("%s; remove the folder to relabel every epoch with this build", mixed)
    elif dd.is_main():
        # A new description: epochs already in the folder belong to other labels (restart), or to none that can be
        # named (relabel writes its description before any epoch), and go first.
        stale = sorted(out_dir.glob("epoch_*.safetensors"))
        if stale:
            log.info("%s: discarding %d label epochs made for other labels", out_dir, len(stale))
        for path in stale:
            path.unlink(missing_ok=True)
        atomic_write_text(meta_path, json.dumps({"ident": ident, "complete": False}, indent=1))
    dd.barrier()
    device = images.device
    normalize = Normalize(spec)
    t0 = time.perf_counter()
    # Epochs are independent (each plan is drawn from (seed, epoch)): ranks take every world-th epoch.
    mine = dd.current_shard().take(range(settings.epochs))
    builds = distinct_builds(reused + ([build_stamp()] if len(reused) < settings.epochs else []))
    for e in tqdm(mine, desc="relabel", unit="epoch", disable=not progress or not dd.is_main(), leave=False):
        path = out_dir / f"epoch_{e:04d}.safetensors"
        if not path.is_file():
            plan = plan_for_epoch(settings, len(labels), spec.image_size, e, device)
            logits = teacher_logits(images, labels, plan, teacher, normalize, settings.micro_batch)
            tensors = {k: v.cpu() for k, v in plan.tensors().items()}
            if settings.topk:
                values, idx = logits.topk(settings.topk, dim=1)
                tensors["topk_values"] = values.half() if settings.dtype == "fp16" else values
                tensors["topk_indices"] = idx.to(torch.int32)
            else:
                tensors["logits"] = logits.half() if settings.dtype == "fp16" else logits
            _save_shard(path, tensors, e)
    dd.barrier()  # every rank's epochs are on disk
    total_bytes = sum((out_dir / f"epoch_{e:04d}.safetensors").stat().st_size for e in range(settings.epochs))
    info = {
        "ident": ident,
        "complete": True,
        # Which code made the epochs: more than one build when a relabel was resumed after cvdd or torch changed.
        "builds": builds,
        "bytes": total_bytes,
        "files": settings.epochs,
        "seconds": time.perf_counter() - t0,
    }
    if dd.is_main():
        atomic_write_text(meta_path, json.dumps(info, indent=1))
    dd.barrier()
    return info


def _differing(prev: dict[str, Any], ident: dict[str, Any]) -> list[str]:
    """The keys of ``ident`` that a label folder's recorded identity contradicts.

    Folders made before the set's digest (``data``) and the experts' weight files (``teacher.files``) were part of
    the identity are compared without them: they stay valid as they were (finished work is kept), and the folder
    records the full identity once this run finishes it.
    """
    new = dict(ident)
    if "data" not in prev:
        new.pop("data", None)
    old_teacher, new_teacher = prev.get("teacher"), new.get("teacher")
    if isinstance(old_teacher, dict) and "files" not in old_teacher and isinstance(new_teacher, dict):
        new["teacher"] = {k: v for k, v in new_teacher.items() if k != "files"}
    return [k for k in new if prev.get(k) != new[k]]


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], epoch: int) -> None:
    """One safetensors file per epoch (its header says what it is; no sidecar file), written atomically."""
    from safetensors.torch import save_file

    tmp = temp_sibling(path)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"kind": "cvdd-label-shard", "epoch": str(epoch), "build": json.dumps(build_stamp())},
        )
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shard_build(path: Path) -> dict[str, str] | None:
    """The build stamp in a label shard's header (None for shards made before stamps, or unreadable ones)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("build", "null"))
    except Exception:  # an unreadable shard is reported where it is loaded (load_shard)
        return None


def load_shard(
    out: str | os.PathLike[str], epoch: int, settings: LabelSettings, num_classes: int, device: torch.device
) -> tuple[EpochPlan, torch.Tensor]:
    """Plan and float32 logits (N, C) of one stored epoch (top-k logits are expanded with -inf elsewhere)."""
    path = Path(out) / f"epoch_{epoch:04d}.safetensors"
    if not path.is_file():
        raise ArtifactError(f"missing label shard {path} (relabel stored fewer epochs than the student trains)")
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"unreadable label shard {path}: {str(exc).splitlines()[0]}") from None
    plan = EpochPlan.from_tensors(
        {
            k: t[k].to(device) if k != "mix_boxes" else t[k]
            for k in ("order", "boxes", "flips", "mix_perm", "mix_boxes")
        },
        settings.batch_size,
    )
    if "logits" in t:
        logits = t["logits"].float().to(device)
    else:
        values = t["topk_values"].float().to(device)
        logits = torch.full((values.shape[0], num_classes), float("-inf"), device=device)
        logits.scatter_(1, t["topk_indices"].long().to(device), values)
    return plan, logits
