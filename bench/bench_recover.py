"""Recover benchmark: wall time, s/image, iterations/s and peak memory of the cifar10-cpu preset on real CIFAR-10.

For N = 1 (SRe2L++) and N = 2 (CV-DD) it runs ``cvdd.recover`` with the ``cifar10-cpu`` preset at the given
IPC, each configuration in a fresh subprocess so that each peak RSS (``ru_maxrss``, a process high-water mark)
is its own. The preset's 300 iterations are shortened (``--iterations``, default 60) and the full preset's
seconds per image are extrapolated linearly from the measured optimisation time (labelled as such).

In the same subprocess it then reproduces one recover iteration of the first unit from the public pieces
(``recover_augment``, the experts under ``BNMatching``, cross-entropy + BN loss, backward, Adam, ``clamp_to_valid``)
and times, as medians over ``--reps`` iterations:

* (a) the full iteration, split into augment / forward+loss / backward / Adam+clamp;
* (b) the experts' forward + loss + backward alone on the same augmented batch (same sub-batches, same BN hooks),
  and without the BN hooks; the share (b) / (a) is the part of an iteration spent inside the experts;
* for N = 2, each committee member's single-expert iteration on the images the committee sends to it, and the
  committee iteration against the sum of those (goal: within 10 %);
* a torch.profiler table of the top operators by self CPU time over a few full iterations.

    python bench/bench_recover.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--experts DIR] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PRESET = "cifar10-cpu"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_EXPERTS = "/tmp/bench-c10-experts"
MARK = "BENCH_RECOVER_JSON "

# The shared measurement code (also used by `cvdd bench --suite speed`) lives in the package.
from cvdd.benchkit import (  # noqa: E402 - after the constants the docs refer to
    UnitBench,
    cpu_seconds,
    machine_busy_seconds,
    recover_phases,
    sync,
    time_unit,
)
from cvdd.device import PhasePeaks  # noqa: E402
from cvdd.synthesis.recover import UnitMember, unit_members  # noqa: E402


def profile_unit(bench: UnitBench, iters: int, top: int) -> dict[str, Any]:
    """torch.profiler over ``iters`` full iterations: top operators by self CPU time and the labelled phases."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with bench:
        bench.full_step(0, iters + 1)  # warm-up outside the profile
        with profile(activities=acts) as prof:
            for t in range(1, iters + 1):
                bench.full_step(t, iters + 1, label=True)
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith("bench::")]
    total_self = sum(e.self_cpu_time_total for e in ops)
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    labels = {e.key: e.cpu_time_total for e in events if e.key.startswith("bench::")}
    return {
        "iters": iters,
        "total_self_cpu_ms": total_self / 1000,
        "top": [[e.key, e.self_cpu_time_total / 1000, e.count] for e in ops[:top]],
        "labels_ms": {k: v / 1000 for k, v in labels.items()},
    }


# --------------------------------------------------------------------------------------------------------------
# One configuration, in its own process
# --------------------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import importlib

    import cvdd
    from cvdd.api import load_pool

    # By module path (the package also exports a function named recover): plan_committees, plan_units.
    rec = importlib.import_module("cvdd.synthesis.recover")
    from cvdd.config import apply_overrides, get_recover_preset
    from cvdd.data.augment import Normalize
    from cvdd.device import derive_seed, resolve_device

    n = args.child
    device = resolve_device(args.device)
    res: dict[str, Any] = {"n": n}
    peaks = PhasePeaks(device)
    peaks.mark("imports")
    t0 = time.perf_counter()
    data = cvdd.load_dataset(args.data, progress=False)
    res["data_load_s"] = time.perf_counter() - t0
    res["n_train"] = len(data.train)
    peaks.mark("data")

    # The two phases of recover_images, timed by wrapping its module-level helpers (src/ is not modified).
    with tempfile.TemporaryDirectory(prefix="bench-recover-") as out, recover_phases(device, peaks) as phase:
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        result = cvdd.recover(
            args.experts,
            out,
            preset=PRESET,
            ipc=args.ipc,
            committee_size=n,
            iterations=args.iterations,
            dataset=data,
            seed=args.seed,
            device=args.device,
            progress=False,
        )
        sync(device)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds() - c0
    peaks.mark("assemble")
    res["rss_peaks_mib"] = peaks.peaks
    res["rss_per_phase"] = peaks.per_phase
    res["rss_peak_mib"] = peaks.process
    res["cpu_per_wall"] = cpu / wall
    if device.type == "cuda":
        # Each mark resets the GPU high-water mark (so each phase has its own): the call's peak is the largest.
        res["cuda_peak_mib"] = max(v for k, v in peaks.peaks.items() if k.endswith("_gpu"))
    meta = result.meta
    res.update(
        wall_s=wall,
        init_s=phase["init"],
        optimise_s=phase["optimise"],
        images=len(result.labels),
        units=result.units_run,
        pool=meta["pool"],
        committees=meta["committees"],
        policy=meta["committee_policy"],
    )

    # ---- the per-iteration micro-benchmark on the first unit, from the recovered images ----------------------
    pool = load_pool(args.experts, device=args.device)
    models = {e.name: e.model.to(device).eval() for e in pool}
    for m in models.values():
        for p in m.parameters():
            p.requires_grad_(False)
    spec = pool[0].spec
    cfg = apply_overrides(
        get_recover_preset(PRESET), {"ipc": args.ipc, "committee_size": n, "iterations": args.iterations}, "bench"
    ).validate(len(pool))
    plan = rec.plan_committees(pool, cfg, args.seed)
    if plan.committees != meta["committees"]:
        raise RuntimeError("the reproduced committee plan differs from the one recover used")
    unit = rec.plan_units(spec.num_classes, cfg)[0]
    n_cls = len(unit.classes)
    ipc = cfg.ipc
    x_rows = torch.stack([result.images[c * ipc + k] for k in unit.ipc_indices for c in unit.classes])
    x0 = Normalize(spec)(x_rows.to(device))
    targets = torch.tensor([c for _ in unit.ipc_indices for c in unit.classes], device=device)
    members = unit_members(plan, unit.ipc_indices, n_cls, device)
    seed = derive_seed(args.seed, "bench-recover", n)
    res["unit_images"] = len(x0)
    res["rows"] = {name: len(m.rows) for name, m in members.items()}
    res["committee"] = time_unit(
        UnitBench(models, x0, targets, members, n_cls, cfg, spec, device, seed), args.reps, args.warmup
    )
    if len(members) > 1:  # each member alone, on exactly the images the committee sends to it
        singles = {}
        for name, m in members.items():
            one = {name: UnitMember(torch.arange(len(m.rows), device=device), m.row_weights, m.index_weights)}
            b = UnitBench(models, x0[m.rows], targets[m.rows], one, n_cls, cfg, spec, device, seed)
            singles[name] = time_unit(b, args.reps, args.warmup)
        res["singles"] = singles
    if args.profile_iters > 0:
        b = UnitBench(models, x0, targets, members, n_cls, cfg, spec, device, seed)
        res["profile"] = profile_unit(b, args.profile_iters, args.top)
    return res


# --------------------------------------------------------------------------------------------------------------
# The parent: one subprocess per configuration, then the tables
# --------------------------------------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, n: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(n),
        "--data",
        args.data,
        "--experts",
        args.experts,
        "--iterations",
        str(args.iterations),
        "--ipc",
        str(args.ipc),
        "--reps",
        str(args.reps),
        "--warmup",
        str(args.warmup),
        "--profile-iters",
        str(args.profile_iters),
        "--top",
        str(args.top),
        "--seed",
        str(args.seed),
    ]
    if args.device:
        cmd += ["--device", args.device]
    load0 = os.getloadavg()[0]
    busy0, child0, t0 = machine_busy_seconds(), _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    busy1, child1, t1 = machine_busy_seconds(), _children_cpu(), time.perf_counter()
    load1 = os.getloadavg()[0]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"configuration N={n} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len(MARK) :])
    res["loadavg"] = (load0, load1)
    # Cores kept busy by other processes while this configuration ran: the contention on a shared machine.
    res["other_cores"] = None if busy0 is None or busy1 is None else (busy1 - busy0 - (child1 - child0)) / (t1 - t0)
    res["child_wall_s"] = t1 - t0
    return res


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)))
    ap.add_argument("--experts", default=DEFAULT_EXPERTS, help="folder of squeezed CIFAR-10 experts (the pool)")
    ap.add_argument("--iterations", type=int, default=60, help="recover iterations of the timed runs")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20, help="timed iterations per micro-benchmark (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-iters", type=int, default=10, help="full iterations under torch.profiler (0: off)")
    ap.add_argument("--top", type=int, default=8, help="operators listed from the profile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--md", default=None, help="also write the tables as Markdown to this file")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print(MARK + json.dumps(run_child(args)), flush=True)
        return

    from cvdd.config import get_recover_preset
    from cvdd.device import resolve_device

    device = resolve_device(args.device)
    preset = get_recover_preset(PRESET)
    experts = sorted(p.stem for p in Path(args.experts).glob("*.json"))
    lines: list[str] = []

    def emit(*rows: str) -> None:
        print("\n".join(rows), flush=True)
        lines.extend(rows)

    emit(
        f"command: {shlex.join(['python', 'bench/bench_recover.py', *sys.argv[1:]])}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), device {device}",
        f"data: {args.data}",
        f"experts: {args.experts} ({', '.join(experts)})",
        f"preset: {PRESET} (preset iterations {preset.iterations}, ipc_per_block {preset.ipc_per_block}, "
        f"init {preset.init}); measured at IPC {args.ipc} with {args.iterations} iterations, each configuration "
        "in a fresh subprocess",
        "",
    )
    results = [spawn(args, n) for n in (1, 2)]

    emit(
        f"| config | committees | wall s ({args.iterations} it) | init s | optimise s | it/s | s/image (measured, "
        f"{args.iterations} it) | s/image @ {preset.iterations} it (extrapolated) | peak RSS MiB: process | "
        "… after imports / during data load / init / optimise | CPU s / wall s | other processes' cores | "
        "load avg (start → end) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    for r in results:
        name = "N=1 (SRe2L++)" if r["n"] == 1 else f"N={r['n']} (CV-DD)"
        committees = sorted({"+".join(c) for c in r["committees"]})
        its = args.iterations * r["units"]
        other = r["wall_s"] - r["init_s"] - r["optimise_s"]
        full_wall = r["init_s"] + other + r["optimise_s"] * preset.iterations / args.iterations
        peak = f"{r['rss_peak_mib']:,.0f}"
        if "cuda_peak_mib" in r:
            peak += f" (CUDA {r['cuda_peak_mib']:,.0f})"
        ph = r["rss_peaks_mib"]
        other = "n/a" if r["other_cores"] is None else f"{r['other_cores']:.2f}"
        keys = ("imports", "data", "init", "optimise")
        phases = " / ".join(f"{ph[k]:,.0f}" for k in keys) if r["rss_per_phase"] else "n/a"
        emit(
            f"| {name} | {r['policy']}: {', '.join(committees)} | {r['wall_s']:.1f} | {r['init_s']:.1f} | "
            f"{r['optimise_s']:.1f} | {its / r['optimise_s']:.2f} | {r['wall_s'] / r['images']:.3f} | "
            f"{full_wall / r['images']:.3f} | {peak} | {phases} | {r['cpu_per_wall']:.2f} | {other} | "
            f"{r['loadavg'][0]:.2f} → {r['loadavg'][1]:.2f} |"
        )
    emit(
        "",
        f"wall = one `cvdd.recover` call ({PRESET}, IPC {args.ipc}) with {args.iterations} iterations "
        + (
            "(the preset's own count, so the @ column equals the measured one); "
            if args.iterations == preset.iterations
            else f"instead of {preset.iterations}; "
        )
        + "init = patch initialisation (observer scoring real crops), optimise = the iterations; "
        + (
            ""
            if args.iterations == preset.iterations
            else f"the @ {preset.iterations} it column is init + the rest + optimise x "
            f"{preset.iterations}/{args.iterations}, extrapolated, not measured. "
        )
        + "Peak RSS is `ru_maxrss` of the configuration's own subprocess; the per-phase "
        "peaks reset the high-water mark (/proc/self/clear_refs) at each phase boundary. CPU s / wall s is the recover "
        "call's own; other processes' cores = the machine's busy CPU-seconds (/proc/stat) minus this configuration's, "
        "per wall second of its whole subprocess (recover + micro-benchmarks): above ~0.1 the timings are contended.",
        "",
        f"Per iteration of the first unit, median of {args.reps} (after {args.warmup} warm-up), ms. (a) = full "
        "iteration; (b) = the experts' forward + loss + backward alone on the same augmented sub-batches with the "
        "BN hooks; (a), (b) and (b) without hooks are measured interleaved (with `compile`, (b) without hooks runs "
        "uncompiled).",
        "",
        "| config | images/expert | (a) full | augment | forward+loss | backward | Adam+clamp | (b) experts | "
        "share (b)/(a) | experts without BN hooks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    for r in results:
        c = r["committee"]
        rows = ", ".join(f"{k} {v}" for k, v in r["rows"].items())
        emit(
            f"| N={r['n']} | {rows} | {c['full_total_ms']:.1f} | {c['full_augment_ms']:.1f} | "
            f"{c['full_forward_ms']:.1f} | {c['full_backward_ms']:.1f} | {c['full_step_ms']:.1f} | "
            f"{c['experts_ms']:.1f} | {100 * c['experts_ms'] / c['full_total_ms']:.0f}% | "
            f"{c['experts_nohooks_ms']:.1f} |"
        )
    for r in results:
        if "singles" not in r:
            continue
        emit(
            "",
            f"N={r['n']} committee iteration vs its members alone (each on the images the committee sends to it), "
            "median ms:",
            "",
            "| expert | images | single-expert iteration | its experts fwd+bwd alone |",
            "|---|---:|---:|---:|",
        )
        tot_full = tot_exp = 0.0
        for name, s in r["singles"].items():
            tot_full += s["full_total_ms"]
            tot_exp += s["experts_ms"]
            emit(f"| {name} | {r['rows'][name]} | {s['full_total_ms']:.1f} | {s['experts_ms']:.1f} |")
        c = r["committee"]
        emit(
            f"| sum of members | | {tot_full:.1f} | {tot_exp:.1f} |",
            f"| committee (one iteration) | {r['unit_images']} | {c['full_total_ms']:.1f} | {c['experts_ms']:.1f} |",
            f"| committee / sum | | {c['full_total_ms'] / tot_full:.2f} | {c['experts_ms'] / tot_exp:.2f} |",
        )
    for r in results:
        if "profile" not in r:
            continue
        p = r["profile"]
        lab = p["labels_ms"]
        tot = sum(lab.values())
        share = ", ".join(f"{k.split('::')[1]} {100 * v / tot:.0f}%" for k, v in sorted(lab.items()))
        emit(
            "",
            f"N={r['n']}: torch.profiler over {p['iters']} full iterations, top operators by self CPU time "
            f"(all operators: {p['total_self_cpu_ms']:.0f} ms); phases by CPU time: {share}",
            "",
            "| operator | self CPU ms | share | calls |",
            "|---|---:|---:|---:|",
        )
        for key, ms, count in p["top"]:
            emit(f"| `{key}` | {ms:.0f} | {100 * ms / p['total_self_cpu_ms']:.1f}% | {count} |")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
