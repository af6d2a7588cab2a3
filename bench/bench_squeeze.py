"""Squeeze benchmark: raw model throughput vs the engine's training loop on real CIFAR-10.

Prints, for each CPU-preset expert and for the CIFAR-style ResNet-18, the forward+backward+step throughput
of the model alone on random tensors and the throughput of ``cvdd.engine.fit`` (shuffling, on-device crop
and flip, normalisation, loss, optimiser, bookkeeping) on real CIFAR-10 images, and their ratio: the
data-pipeline overhead made visible. With ``--train`` it also squeezes the CPU-preset experts in full on
real CIFAR-10 and prints test accuracy and wall time.

    python bench/bench_squeeze.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--train] [--md FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cvdd.config import apply_overrides, get_squeeze_preset
from cvdd.data.sources import load_dataset
from cvdd.device import resolve_device
from cvdd.engine import fit
from cvdd.engine.loop import build_optimizer
from cvdd.models import create_model

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def raw_throughput(arch: str, batch: int, steps: int, device: torch.device, recipe) -> float:
    """Images/s of forward + backward + optimiser step on random tensors (no data pipeline)."""
    torch.manual_seed(0)
    model = create_model(arch, 10, 32).to(device).train()
    opt = build_optimizer(model, recipe)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    def step() -> None:
        loss = ce(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def engine_throughput(arch: str, data, recipe, steps: int, device: torch.device, repeats: int = 3) -> float:
    """Images/s of one epoch of ``fit`` over ``steps`` batches of real images (median of ``repeats``)."""
    subset = data.train.subset(recipe.batch_size * steps // 10, 10, seed=0)
    r = apply_overrides(recipe, {"epochs": 1, "warmup_epochs": 0.0}, "bench")
    rates = []
    for i in range(repeats + 1):
        torch.manual_seed(0)
        model = create_model(arch, 10, 32)
        res = fit(model, subset, None, r, spec=data.spec, device=device, seed=i, progress=False)
        if i:  # the first run warms up allocators and kernels
            rates.append(res.images_per_s)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)))
    ap.add_argument("--archs", nargs="+", default=None, help="default: the cifar10-cpu preset's experts + resnet18")
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps per measurement")
    ap.add_argument("--train", action="store_true", help="also squeeze the CPU preset in full and report accuracy")
    ap.add_argument("--out", default="runs/bench-squeeze", help="experts folder for --train")
    ap.add_argument("--device", default=None)
    ap.add_argument("--md", default=None, help="also write the tables as Markdown to this file")
    args = ap.parse_args()

    device = resolve_device(args.device)
    preset = get_squeeze_preset("cifar10-cpu")
    archs = args.archs or [*preset.archs, "resnet18"]
    t0 = time.perf_counter()
    data = load_dataset(args.data, progress=False)
    load_s = time.perf_counter() - t0
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), device {device}",
        f"data: {args.data} ({len(data.train)} train / {len(data.test)} test, loaded in {load_s:.1f} s)",
        f"recipe: cifar10-cpu (batch {preset.recipe.batch_size}, {preset.recipe.optimizer}, "
        f"augment {preset.recipe.augment}), {args.steps} steps per measurement, median",
        "",
        "| expert | raw fwd+bwd img/s | engine img/s (real CIFAR-10) | engine / raw |",
        "|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for arch in archs:
        steps = args.steps if arch != "resnet18" else max(3, args.steps // 5)
        raw = raw_throughput(arch, preset.recipe.batch_size, steps, device, preset.recipe)
        eng = engine_throughput(arch, data, preset.recipe, steps, device)
        row = f"| {arch} | {raw:,.0f} | {eng:,.0f} | {eng / raw:.2f} |"
        print(row, flush=True)
        lines.append(row)

    if args.train:
        import cvdd

        header = [
            "",
            "| expert (cifar10-cpu) | epochs | test top-1 | wall s | train img/s |",
            "|---|---:|---:|---:|---:|",
        ]
        print("\n".join(header), flush=True)
        lines += header
        results = cvdd.squeeze(data, out=args.out, preset="cifar10-cpu", device=args.device, progress=False)
        for r in results:
            row = (
                f"| {r.arch} | {preset.recipe.epochs} | {100 * r.test_acc:.2f}% | {r.seconds:.0f} | "
                f"{r.images_per_s:,.0f} |"
            )
            print(row, flush=True)
            lines.append(row)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
