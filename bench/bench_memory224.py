"""Peak memory of recover on a 224 px batch of 100 images with the paper's ImageNet-1K committee.

The committee is torchvision's ResNet-18 + ResNet-50 (cvdd's ``resnet18``/``resnet50`` at 224 px, randomly
initialised: memory does not depend on the weights), 1,000 classes, one unit of 100 classes at one IPC index
(``classes_per_block=100`` and ``--shard 0/10`` runs exactly that unit), Gaussian initialisation (no data).
Each configuration runs in a fresh subprocess and reports its own ``ru_maxrss`` (CPU) or
``torch.cuda.max_memory_allocated`` (GPU), so the figures do not mix.

    python bench/bench_memory224.py --iterations 2                 # fp32, bf16, each with and without checkpoint
    python bench/bench_memory224.py --code /tmp/old/src            # the same against another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARK = "BENCH_MEMORY224_JSON "


def child(setting: str, iterations: int, device: str) -> None:
    """Run one recover unit and print its peak memory as one JSON line (``setting``: ``fp32``, ``bf16+checkpoint``)."""
    import torch

    from cvdd.data.specs import DatasetSpec, known_constants
    from cvdd.device import peak_rss_mib
    from cvdd.distributed import Shard
    from cvdd.experts import Expert
    from cvdd.models import create_model
    from cvdd.synthesis.recover import RecoverConfig, recover_images

    precision, *flags = setting.split("+")
    checkpoint = "checkpoint" in flags
    compile_experts = "compile" in flags
    spec = DatasetSpec(
        name="imagenet1k", classes=tuple(f"c{i:04d}" for i in range(1000)), **known_constants("imagenet1k")
    )
    experts = []
    for i, arch in enumerate(["resnet18", "resnet50"]):
        torch.manual_seed(i)
        model = create_model(arch, 1000, 224)
        experts.append(Expert(arch, arch, model.eval(), {"test_acc": 0.7 + 0.01 * i}, spec))
    cfg = RecoverConfig(
        ipc=1,
        committee_size=2,
        committee="fixed",
        fixed=["resnet18", "resnet50"],
        iterations=iterations,
        init="gaussian",
        classes_per_block=100,
        precision=precision,
        checkpoint=checkpoint,
        compile=compile_experts,
        log_every=1,
    )
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        recover_images(experts, cfg, out, data=None, seed=0, device=device, progress=False, shard=Shard(0, 10))
    seconds = time.perf_counter() - t0
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    print(
        MARK
        + json.dumps(
            {
                "precision": setting,
                "iterations": iterations,
                "seconds": seconds,
                "peak_rss_mib": peak_rss_mib(),
                "rss_after_model_build_mib": rss_before,
                "gpu_max_allocated_mib": gpu,
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16", "fp32+checkpoint", "bf16+checkpoint"],
        help="settings: fp32 or bf16, +checkpoint for activation checkpointing of the experts' blocks, +compile for "
        "torch.compile of the experts (the compilation's own memory is in the peak)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--code", default=None, help="PYTHONPATH of the cvdd to measure (default: the installed one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.iterations, args.device)
        return
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = args.code
    rows = []
    for p in args.precisions:
        cmd = [sys.executable, __file__, "--child", p, "--iterations", str(args.iterations), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith(MARK)), None)
        if line is None:
            sys.exit(f"child {p} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[len(MARK) :]))
    print("| setting | iterations | s/iteration (incl. build) | peak RSS GiB | GPU max allocated GiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        gpu = "-" if r["gpu_max_allocated_mib"] is None else f"{r['gpu_max_allocated_mib'] / 1024:.2f}"
        print(
            f"| {r['precision']} | {r['iterations']} | {r['seconds'] / r['iterations']:.1f} | "
            f"{r['peak_rss_mib'] / 1024:.2f} | {gpu} |"
        )
    print(f"\ncode: {args.code or Path(__import__('cvdd').__file__).parent}; threads {rows[0]['threads']}")


if __name__ == "__main__":
    main()
