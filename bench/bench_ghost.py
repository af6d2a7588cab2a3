"""Student epoch time with the step's micro-batches as separate forwards or as one ghost-BN forward.

The evaluation recipe trains on batches of 16 in two micro-batches of 8 (the BN group of BSSL). ``ghost_bn``
runs both in one forward whose BN layers normalise each micro-batch apart (the same step up to rounding,
tests/engine/test_ghost.py). On a GPU, where a 16-image step of a 32 px ResNet-18 is bound by kernel launches,
that should halve the launches of everything but BN; on a CPU it only adds work. Time per epoch of 100 random real
CIFAR-10 images (IPC 10), hard labels, as the difference of a 6- and a 2-epoch run (set-up cancels), median of
``--repeats`` alternating runs.

    python bench/bench_ghost.py [--device cuda] [--students convnet_d3_w64 resnet18]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--students", nargs="+", default=["convnet_d3_w64", "resnet18"])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from cvdd.api import load_dataset
    from cvdd.evaluate.student import EvalConfig, evaluate_synthetic, random_real_set

    data = load_dataset(args.data, progress=False)
    images, labels = random_real_set(data, 10, seed=0)
    test = dataclasses.replace(data.test, images=data.test.images[:200], labels=data.test.labels[:200])
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Student epoch, IPC 10 (100 images), batch 16 = 2 micro-batches of 8; {where}, torch {torch.__version__}")
    print()
    print("| student | micro-batch forwards ms/epoch | ghost_bn ms/epoch | ghost / micro |")
    print("|---|---:|---:|---:|")
    for student in args.students:
        ms: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for ghost in (False, True):
                seconds = []
                for epochs in (2, 6):
                    cfg = EvalConfig(student=student, epochs=epochs, label_mode="hard", seeds=[0], ghost_bn=ghost)
                    t0 = time.perf_counter()
                    evaluate_synthetic(images, labels, data.spec, test, cfg, device=args.device, progress=False)
                    seconds.append(time.perf_counter() - t0)
                ms[ghost].append(1000 * (seconds[1] - seconds[0]) / 4)
        a, b = statistics.median(ms[False]), statistics.median(ms[True])
        print(f"| {student} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
