"""Operators per expert forward + backward in recover, with and without BN matching: a proxy for GPU launches.

On a GPU, a recover iteration on a few 32 px images is bound by how many kernels it launches and by the host's
per-operator overhead, not by arithmetic: on an H200, DenseNet-121 on 100 images took ~104 ms per iteration
(docs/benchmarks/gpu-h200.md) for about 0.5 TFLOP of work. Every operator that does work becomes at least one
kernel, so the count of such operators in one forward + backward, which any CPU can measure with torch.profiler,
tells how much of that overhead the BN-matching hooks add.

With ``--device cuda`` it also times the step on the GPU (median of ``--reps`` synchronised steps after a warm-up),
so the count can be checked against what the launches cost there.

Counted: profiler events of ``aten::`` operators that do work themselves (no child operator that does work), leaving
out views, allocations and no-op conversions. Printed per architecture: the plain network (cross-entropy only),
the network with BN matching, and the ratio.

    python bench/bench_ops.py [--archs densenet121 resnet50 ...] [--batch 10] [--code /other/checkout/src]
    python bench/bench_ops.py --device cuda          # counts, and milliseconds per step on the GPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import sys
from typing import Any

NO_WORK = {
    "aten::view",
    "aten::as_strided",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::resize_",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::t",
    "aten::detach",
    "aten::alias",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::transpose",
    "aten::permute",
    "aten::as_strided_",
    "aten::set_",
    "aten::lift_fresh",
    "aten::_unsafe_view",
    "aten::to",
    "aten::promote_types",
    "aten::resolve_conj",
}
PAPER = ["resnet18", "resnet50", "densenet121", "mobilenetv2", "shufflenetv2"]


def count_ops(
    arch: str, batch: int, bn_matching: bool, device: str = "cpu", reps: int = 20
) -> tuple[int, collections.Counter[str], float]:
    """Working operators of one forward + cross-entropy (+ BN loss) + backward of ``arch`` on ``batch`` images.

    Returns:
        The count, the count per operator, and the median milliseconds of a step on ``device``.
    """
    import statistics
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from cvdd.models import create_model
    from cvdd.synthesis.bn_matching import BNMatching

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(arch, num_classes=10, image_size=32).eval().to(dev)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 32, 32, device=dev, requires_grad=True)
    y = torch.arange(batch, device=dev) % 10
    # One BN-matching context for all steps, as recover keeps one per unit for all its iterations.
    bn = BNMatching(model)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if bn_matching:
            loss = loss + 0.01 * bn.loss()
        loss.backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    with bn if bn_matching else contextlib.nullcontext():
        step()  # warm-up: one-time initialisation is not counted
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    counts = working_ops(prof)
    return sum(counts.values()), counts, 1000 * statistics.median(times)


def working_ops(prof: Any) -> collections.Counter[str]:
    """Count a profile's ``aten::`` operators that do work themselves (no working child; views etc. left out)."""
    counts: collections.Counter[str] = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in NO_WORK:
            continue
        if any(k.name.startswith("aten::") and k.name not in NO_WORK for k in e.cpu_children):
            continue
        counts[e.name] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=PAPER)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=20, help="timed steps (median)")
    ap.add_argument("--code", default=None, help="PYTHONPATH of the cvdd to measure (default: the installed one)")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, mode = args.child
        total, _, ms = count_ops(arch, args.batch, mode == "bn", args.device, args.reps)
        print(total, ms)
        return
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = args.code
    print(f"# Working operators per forward + backward, batch {args.batch}, 32 px, 10 classes, device {args.device}")
    print()
    print("| expert | plain (CE only) | with BN matching | ratio | ms plain | ms with BN matching |")
    print("|---|---:|---:|---:|---:|---:|")
    child_args = [sys.executable, __file__, "--batch", str(args.batch), "--device", args.device]
    child_args += ["--reps", str(args.reps)]
    for arch in args.archs:
        row = []
        for mode in ("plain", "bn"):
            # A fresh process per count: profiler state and lazy initialisation do not leak between counts.
            out = subprocess.run(
                [*child_args, "--child", arch, mode],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            count, ms = out.strip().splitlines()[-1].split()
            row.append((int(count), float(ms)))
        (n0, t0), (n1, t1) = row
        print(f"| {arch} | {n0:,} | {n1:,} | {n1 / n0:.2f} | {t0:.1f} | {t1:.1f} |")


if __name__ == "__main__":
    main()
