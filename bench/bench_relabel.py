"""One stored-label epoch of a BSSL teacher: one forward per micro-batch against all micro-batches in one forward.

The BSSL teacher labels each student micro-batch with that micro-batch's own BN statistics. Run one micro-batch at
a time, a 100-image epoch in batches of 16 and micro-batches of 8 is 14 forwards per expert; on a GPU such an epoch
is bound by kernel launches (relabel took 76 of the 380 s of `cvdd bench --preset cifar10-gpu --budget small` on an
H200, docs/benchmarks/gpu-h200.md). On CUDA ``cvdd.labels.stored.teacher_logits`` runs the batches of an epoch as
one forward whose BN layers compute every micro-batch's statistics at once
(``cvdd.engine.ghost.grouped_batch_statistics``). This script times both on the same teacher and inputs:

* ``per micro-batch``: ``teacher_logits(..., fuse=False)``, one forward per micro-batch (the CPU default, and
  every device's before);
* ``fused``: ``teacher_logits(..., fuse=True)`` (the CUDA default).

It prints milliseconds per label epoch (median of ``--reps`` after a warm-up), the working operators per epoch
(profiler, as ``bench/bench_ops.py`` counts them: each is at least one GPU kernel) and the largest difference of
the logits. The experts are randomly initialised (time does not depend on the weights); their BN layers in BSSL
mode use batch statistics.

    python bench/bench_relabel.py                                 # CPU committee (convnet_d3_w64 + resnet8)
    python bench/bench_relabel.py --device cuda --archs resnet18 resnet50 shufflenetv2 mobilenetv2 densenet121
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from torch.profiler import ProfilerActivity, profile

    from bench_ops import working_ops
    from cvdd.data.augment import Normalize
    from cvdd.data.specs import DatasetSpec
    from cvdd.experts import Expert
    from cvdd.labels import LabelSettings, Teacher
    from cvdd.labels.stored import plan_for_epoch, teacher_logits
    from cvdd.models import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["convnet_d3_w64", "resnet8"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ipcs", nargs="+", type=int, default=[10, 50])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--precision", default="auto", help="fp32, bf16, or auto (bf16 on CUDA)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    dev = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    spec = DatasetSpec("cifar10-like", tuple(str(i) for i in range(10)), 32, (0.5,) * 3, (0.25,) * 3)
    experts = []
    for i, arch in enumerate(args.archs):
        torch.manual_seed(i)
        model = create_model(arch, 10, 32).eval().to(dev)
        for p in model.parameters():
            p.requires_grad_(False)
        experts.append(Expert(arch, arch, model, {"test_acc": 0.5}, spec))
    teacher = Teacher(experts, [1 / len(experts)] * len(experts), group_size=args.micro)
    teacher.precision = precision
    norm = Normalize(spec)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    print(
        f"# One stored-label epoch, teacher {'+'.join(args.archs)} (BSSL, groups of {args.micro}, batch {args.batch}, "
        f"{precision}), device {dev}{' ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.reps}"
    )
    print()
    print("| IPC | images | per micro-batch ms | fused ms | speed-up | operators per micro-batch | fused | max diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ipc in args.ipcs:
        n = 10 * ipc
        g = torch.Generator().manual_seed(ipc)
        images = torch.rand(n, 3, 32, 32, generator=g).to(dev)
        labels = torch.arange(10).repeat_interleave(ipc).to(dev)
        settings = LabelSettings(epochs=1, batch_size=args.batch, micro_batch=args.micro, seed=0, dtype="fp32")
        plan = plan_for_epoch(settings, n, 32, 0, dev)

        row = []
        for fuse in (False, True):  # fuse=False: one forward per micro-batch (the CPU default)
            args_ = (images, labels, plan, teacher, norm, args.micro)
            out = teacher_logits(*args_, fuse=fuse)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                teacher_logits(*args_, fuse=fuse)
            times = []
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                teacher_logits(*args_, fuse=fuse)
                sync()
                times.append(time.perf_counter() - t0)
            row.append((1000 * statistics.median(times), sum(working_ops(prof).values()), out))
        (t0, n0, a), (t1, n1, b) = row
        diff = float((a - b).abs().max())
        print(f"| {ipc} | {n} | {t0:.1f} | {t1:.1f} | {t0 / t1:.2f}x | {n0:,} | {n1:,} | {diff:.2e} |")


if __name__ == "__main__":
    main()
