"""Recover and student speed under the execution switches: default, channels_last, torch.compile, bf16.

Per-iteration (recover) and per-epoch (student) times exclude compilation and warm-up: each switch runs
three times: a discarded warm-up with the short budget (it pays the compilation and warms the caches), then the
short and the long budget; the time per iteration is the difference of the last two divided by the difference
in iterations. Each switch is measured in a fresh
subprocess, alternating, ``--repeats`` times; the table gives medians and each switch's ratio to the default.

    python bench/bench_switches.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--experts DIR] [--device cpu]

Recover: real CIFAR-10, the ``cifar10-cpu`` preset at IPC 10 with N = 2 (100 images in one unit).
Student: convnet_d3_w64 on 100 random real images with hard labels (batch 16, micro-batches of 8).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# Each row differs from the first by one switch. The baseline is NCHW explicitly: channels_last became the training
# default on every device (2026-11-27), so "no switch" would no longer be the layout the other rows compare against.
# The same holds for compile since the cifar10-cpu recover preset turned it on (2026-11-27): every row but `compile`
# sets it off.
SWITCHES: dict[str, dict[str, object]] = {
    "default": {"channels_last": False, "compile": False},
    "channels_last": {"channels_last": True, "compile": False},
    "compile": {"channels_last": False, "compile": True},
    "bf16": {"channels_last": False, "compile": False, "precision": "bf16"},
    "compile+channels_last": {"channels_last": True, "compile": True},
}
MARK = "BENCH_SWITCH "


def _child(args: argparse.Namespace) -> None:
    import cvdd
    from cvdd.api import load_dataset
    from cvdd.evaluation.student import EvalConfig, evaluate_synthetic, random_real_set

    over = SWITCHES[args.switch]
    data = load_dataset(args.data, progress=False)
    out: dict[str, float] = {}
    recover_s = []
    # A discarded warm-up run first: compilation caches (in memory and inductor's on disk) are then warm for both
    # timed runs, so their difference holds no compilation (without it, the long run reused the short run's
    # cache and the difference came out negative).
    for iters in (args.short, args.short, args.long):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            cvdd.recover(
                args.experts,
                tmp,
                preset="cifar10-cpu",
                ipc=10,
                iterations=iters,
                dataset=data,
                overrides=dict(over),
                device=args.device,
                progress=False,
            )
            recover_s.append(time.perf_counter() - t0)
    out["recover_ms_per_iteration"] = 1e3 * (recover_s[2] - recover_s[1]) / (args.long - args.short)
    out["recover_first_call_s"] = recover_s[0] - args.short * out["recover_ms_per_iteration"] / 1e3
    images, labels = random_real_set(data, 10, seed=0)
    student_s = []
    for epochs in (args.short_epochs, args.short_epochs, args.long_epochs):  # warm-up first, as above
        cfg = EvalConfig(student="convnet_d3_w64", epochs=epochs, label_mode="hard", seeds=[0], **over)
        t0 = time.perf_counter()
        evaluate_synthetic(images, labels, data.spec, data.test, cfg, device=args.device)
        student_s.append(time.perf_counter() - t0)
    out["student_ms_per_epoch"] = 1e3 * (student_s[2] - student_s[1]) / (args.long_epochs - args.short_epochs)
    print(MARK + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--experts", default="/tmp/bench-c10-experts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--short", type=int, default=20, help="recover iterations of the short run")
    ap.add_argument("--long", type=int, default=80, help="recover iterations of the long run")
    ap.add_argument("--short-epochs", type=int, default=5)
    ap.add_argument("--long-epochs", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
    ap.add_argument("--switch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.switch:
        _child(args)
        return
    results: dict[str, list[dict[str, float]]] = {s: [] for s in args.switches}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for s in args.switches:  # alternating, so drift of a shared machine hits every switch alike
            cmd = [sys.executable, __file__, "--switch", s]
            cmd += ["--data", args.data, "--experts", args.experts, "--device", args.device]
            cmd += ["--short", str(args.short), "--long", str(args.long)]
            cmd += ["--short-epochs", str(args.short_epochs), "--long-epochs", str(args.long_epochs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))
            results[s].append(json.loads(line[len(MARK) :]))
            # Each run as it finishes, so that a time-boxed call (the GPU session) keeps what it measured.
            print(f"{s}: {line[len(MARK) :]}", flush=True)
    print(f"command: python bench/bench_switches.py {' '.join(sys.argv[1:])}")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"device {args.device}; {args.repeats} alternating repeats, medians; {time.perf_counter() - t0:.0f} s"
    )
    print()
    print(
        "| switch | recover ms / iteration (IPC 10, N = 2) | vs default | first call's one-time s (init, compile) "
        "| student ms / epoch (100 images) | vs default |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in results.items() if rs}
    base = med.get("default")
    for s, m in med.items():
        rr = f"{m['recover_ms_per_iteration'] / base['recover_ms_per_iteration']:.2f}" if base else "-"
        sr = f"{m['student_ms_per_epoch'] / base['student_ms_per_epoch']:.2f}" if base else "-"
        print(
            f"| {s} | {m['recover_ms_per_iteration']:.1f} | {rr} | {m['recover_first_call_s']:.1f} "
            f"| {m['student_ms_per_epoch']:.1f} | {sr} |"
        )


if __name__ == "__main__":
    main()
