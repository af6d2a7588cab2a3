"""Recover with several IPC indices fused into one batch (``bn_groups=ipc``) against one index per batch.

With ``ipc_per_block=1`` (the paper) each IPC index is its own unit and batch: CIFAR-10 IPC 10 makes ten batches of
ten images, each pushed through its committee ``iterations`` times. ``ipc_per_block=K`` with ``bn_groups=ipc``
optimises K indices in one batch while each index keeps its own BN statistics and voter weights, which is the same
loss with the default ``combine: sum`` (tests/synthesis/test_bn_matching.py checks it in value and gradient). The
augmentation differs: the fused indices share one crop and flip per iteration (``shared_crop``). On a GPU,
where a batch of ten 32 px images leaves the device idle between kernel launches, this is the "larger fused
step" the recipe allows.

The time per iteration of all the indices is the difference of a long and a short run divided by the difference of
their iterations, so initialisation and warm-up cancel out.

    python bench/bench_fused.py --experts DIR [--data CIFAR10_TARBALL] [--device cuda] [--preset cifar10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", required=True, help="folder of squeezed experts (the pool)")
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)))
    ap.add_argument("--preset", default="cifar10", help="recover preset (default: the paper's cifar10)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--committee-size", type=int, default=2)
    ap.add_argument("--short", type=int, default=20, help="iterations of the short run")
    ap.add_argument("--long", type=int, default=120, help="iterations of the long run")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import cvdd
    from cvdd.device import resolve_device

    device = resolve_device(args.device)
    real = cvdd.load_dataset(args.data, progress=False)
    work = Path(tempfile.mkdtemp(prefix="bench-fused-"))

    def run(tag: str, iterations: int, over: dict) -> float:
        t0 = time.perf_counter()
        cvdd.recover(
            args.experts,
            work / tag,
            dataset=real,
            preset=args.preset,
            ipc=args.ipc,
            committee_size=args.committee_size,
            overrides={"init": "real", "log_every": 10**6, "iterations": iterations, **over},
            device=str(device),
            progress=False,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    configs = {
        "one index per batch (ipc_per_block 1)": {"ipc_per_block": 1, "bn_groups": "block"},
        f"{args.ipc} indices fused (ipc_per_block {args.ipc}, bn_groups ipc)": {
            "ipc_per_block": args.ipc,
            "bn_groups": "ipc",
        },
    }
    run("warm-up", 3, {"ipc_per_block": args.ipc, "bn_groups": "ipc"})
    ms = {}
    for i, (name, over) in enumerate(configs.items()):
        short = run(f"{i}-short", args.short, over)
        long = run(f"{i}-long", args.long, over)
        ms[name] = 1000 * (long - short) / (args.long - args.short)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# Fused recover: {args.preset}, IPC {args.ipc}, N = {args.committee_size}, {where}")
    print(f"torch {torch.__version__}")
    print()
    print("| configuration | ms per iteration of all indices | full 4000 iterations (s) |")
    print("|---|---:|---:|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} | {4 * v:.0f} |")
    a, b = ms.values()
    print()
    print(f"fused / per-index: {b / a:.3f} ({a / b:.1f}x faster); long - short runs of {args.long} - {args.short} it.")


if __name__ == "__main__":
    main()
