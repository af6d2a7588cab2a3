"""What the resume checkpoints cost a student's training: one per epoch, one per ``checkpoint_every_s``, none.

An evaluation trains each student with a resume checkpoint (``cvdd distill``/``bench`` keep them under the run's
``students/`` folder until the row is written). A ResNet-18 student's checkpoint holds its weights and its AdamW
moments: 134 MB, written atomically. On a GPU a 100-image student epoch takes a fraction of the time that write
does, so writing after every epoch would make the checkpoints most of the evaluation. Since 2026-11-27 ``fit``
writes one after the last epoch and otherwise at most every ``checkpoint_every_s`` seconds (60 by default).

This trains one student per mode on 100 random real CIFAR-10 images (``--data digits``: the embedded digits; IPC
10, hard labels, the evaluation recipe: batch 16 in micro-batches of 8, CutMix, random-resized crops) through
:func:`cvdd.engine.fit` with the checkpoint the evaluation uses, and prints the wall time per epoch (the whole call
divided by the epochs, so the first epoch's warm-up is in every mode alike), the checkpoint writes and their size.
Modes alternate, ``--repeats`` times; medians are printed.

    python bench/bench_checkpoint.py [--device cuda] [--students resnet18] [--epochs 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MODES = {"no checkpoint": None, "every epoch (checkpoint_every_s 0)": 0.0, "default (checkpoint_every_s 60)": 60.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)), help="or digits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--students", nargs="+", default=["resnet18"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ipc", type=int, default=10)
    args = ap.parse_args()

    import torch

    import cvdd.engine.loop as fit_module
    from cvdd.api import load_dataset
    from cvdd.evaluation.student import EvalConfig, SyntheticBatches, random_real_set
    from cvdd.models import create_model

    writes: list[int] = []
    real_save = fit_module.save_checkpoint

    def counted_save(*a: Any, **kw: Any) -> None:
        writes.append(1)
        real_save(*a, **kw)

    fit_module.save_checkpoint = counted_save  # counts the writes; the write itself is the real one

    data = load_dataset(args.data, progress=False)
    images, labels = random_real_set(data, args.ipc, seed=0)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    where = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# Resume checkpoints in a student's training: IPC {args.ipc} ({len(labels)} images), {args.epochs} epochs, "
        f"batch 16 = 2 micro-batches of 8, hard labels; {where}, torch {torch.__version__}"
    )
    print()
    print("| student | checkpoints | wall ms per epoch | vs no checkpoint | writes | checkpoint MB |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for student in args.students:
            # One untimed run first: CUDA's and cuDNN's start-up would otherwise land on the first (baseline) mode.
            warm = EvalConfig(student=student, epochs=1, label_mode="hard", seeds=[0])
            fit_module.fit(
                create_model(student, data.spec.num_classes, data.spec.image_size),
                SyntheticBatches(images, labels, data.spec, warm, dev),
                None,
                warm.recipe(),
                spec=data.spec,
                device=dev,
                progress=False,
            )
            ms: dict[str, list[float]] = {m: [] for m in MODES}
            count: dict[str, int] = {}
            size = 0.0
            for _ in range(args.repeats):
                for mode, every in MODES.items():
                    cfg = EvalConfig(student=student, epochs=args.epochs, label_mode="hard", seeds=[0])
                    cfg.checkpoint_every_s = 60.0 if every is None else every
                    source = SyntheticBatches(images, labels, data.spec, cfg, dev)
                    torch.manual_seed(0)
                    model = create_model(student, data.spec.num_classes, data.spec.image_size)
                    ckpt = None if every is None else Path(tmp) / f"{student}.pt"
                    if ckpt is not None:
                        ckpt.unlink(missing_ok=True)  # a fresh run each time, never a resume
                    writes.clear()
                    t0 = time.perf_counter()
                    fit_module.fit(
                        model, source, None, cfg.recipe(), spec=data.spec, device=dev, checkpoint=ckpt, progress=False
                    )
                    if cuda:
                        torch.cuda.synchronize(dev)
                    ms[mode].append(1000 * (time.perf_counter() - t0) / args.epochs)
                    count[mode] = len(writes)
                    if ckpt is not None:
                        size = ckpt.stat().st_size / 1e6
            base = statistics.median(ms["no checkpoint"])
            for mode in MODES:
                med = statistics.median(ms[mode])
                mb = "-" if MODES[mode] is None else f"{size:.1f}"
                print(f"| {student} | {mode} | {med:.1f} | {med / base:.2f} | {count[mode]} | {mb} |", flush=True)


if __name__ == "__main__":
    main()
