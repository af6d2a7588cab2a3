"""Training step time in NCHW (contiguous) against channels_last, for the CPU networks of squeeze and evaluate.

One optimiser step (AdamW) of a model in train mode on random 32 px images: a squeeze step (one batch of 256) and
a student step (a batch of 16 in two micro-batches of 8, as the evaluation recipe). Median of ``--reps`` steps
after one warm-up step; the two layouts alternate twice and the two medians of each are averaged.

    python bench/bench_layout.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

CASES = [  # (architecture, batch, micro-batch)
    ("convnet_d3_w64", 16, 8),
    ("resnet8", 16, 8),
    ("resnet18", 16, 8),
    ("convnet_d3_w32", 256, 256),
    ("convnet_d3_w64", 256, 256),
    ("resnet8", 256, 256),
]


def step_ms(arch: str, batch: int, micro: int, channels_last: bool, device: str, reps: int) -> float:
    """Median milliseconds of one AdamW step (forward and backward of every micro-batch, then the update)."""
    import torch

    from cvdd.models import create_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(arch, 10, 32).train().to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(batch, 3, 32, 32, device=dev), torch.randint(0, 10, (batch,), device=dev)
    times = []
    for r in range(reps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad()
        for xs, ys in zip(x.split(micro), y.split(micro)):
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if r:  # the first step is warm-up
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()

    import torch

    where = f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# Training step, NCHW vs channels_last; {where}")
    print()
    print("| network | batch (micro-batch) | NCHW ms | channels_last ms | channels_last / NCHW |")
    print("|---|---|---:|---:|---:|")
    for arch, batch, micro in CASES:
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(2):
            for cl in (False, True):
                runs[cl].append(step_ms(arch, batch, micro, cl, args.device, args.reps))
        a, b = statistics.fmean(runs[False]), statistics.fmean(runs[True])
        print(f"| {arch} | {batch} ({micro}) | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
