"""Student training time per seed: micro-batch forwards, ghost BN, and every seed's student stacked into one model.

The evaluation recipe trains one student per seed on batches of 16 in two micro-batches of 8 (the BN group of
BSSL). Two switches cut the forwards of that loop, each the same training up to rounding:

- ``ghost_bn`` runs a step's micro-batches as one forward whose BN layers normalise each micro-batch apart
  (tests/engine/test_ghost.py);
- ``stack_seeds`` trains the k seeds' students at once as one vectorised model (grouped convolutions,
  tests/engine/test_stacked.py).

On a GPU, where a 16-image step of a 32 px ResNet-18 is bound by kernel launches, both should divide the launches;
on a CPU they only add work. Each configuration trains all seeds' students for ``--epochs`` epochs on 100 random
real CIFAR-10 images (IPC 10, hard labels, CutMix and random-resized crops as the recipe), and the figure is the
median of the per-epoch seconds that ``fit`` records (the first epoch, warm-up, dropped), summed over the seeds
that ran one after the other or divided by the number of stacked seeds: ms per student-epoch. Configurations
alternate, ``--repeats`` times; the median over repeats is printed.

With ``--ops`` it also counts the working operators of one epoch per student (torch.profiler, the definition of
``bench/bench_ops.py``): every one is at least one GPU kernel launch, so the count is the launch proxy any CPU can
measure.

    python bench/bench_student.py [--device cuda] [--students convnet_d3_w64 resnet18] [--seeds 3] [--ops]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MODES = {  # label: EvalConfig switches
    "micro-batch forwards": {},
    "ghost_bn": {"ghost_bn": True},
    "stack_seeds": {"stack_seeds": True},
    "stack_seeds + ghost_bn": {"stack_seeds": True, "ghost_bn": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("CVDD_CIFAR10_TAR", str(DEFAULT_DATA)))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--students", nargs="+", default=["convnet_d3_w64", "resnet18"])
    ap.add_argument("--seeds", type=int, default=3, help="students trained per configuration")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is not counted)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ops", action="store_true", help="also count working operators per student-epoch")
    args = ap.parse_args()

    import torch

    from cvdd.api import load_dataset
    from cvdd.engine import fit
    from cvdd.engine.stacked import fit_stacked
    from cvdd.evaluation.student import EvalConfig, SyntheticBatches, random_real_set
    from cvdd.models import create_model

    data = load_dataset(args.data, progress=False)
    images, labels = random_real_set(data, 10, seed=0)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# Student epoch, IPC 10 (100 images), batch 16 = 2 micro-batches of 8, {args.seeds} seeds; ms per "
        f"student-epoch; {where}, torch {torch.__version__}"
    )
    print()
    print("| student | " + " | ".join(MODES) + " | best / micro-batch forwards |")
    print("|---|" + "---:|" * (len(MODES) + 1))
    seeds = list(range(args.seeds))
    dev = torch.device(args.device)

    def train(student: str, switches: dict[str, bool], epochs: int, profile_epoch: int = -1) -> tuple[float, int]:
        """ms per student-epoch (median of the epochs after the first) and working operators per student-epoch."""
        cfg = EvalConfig(student=student, epochs=epochs, label_mode="hard", seeds=seeds, **switches)
        plain = SyntheticBatches(images, labels, data.spec, cfg, dev)
        source = Profiled(plain, profile_epoch)
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(create_model(student, data.spec.num_classes, data.spec.image_size))
        kw = {"spec": data.spec, "device": dev, "progress": False}
        if cfg.stack_seeds:
            # One profiled source: its profile spans the whole stacked epoch (the others are advanced inside it).
            sources = [source] + [plain] * (len(seeds) - 1)
            runs = fit_stacked(models, sources, None, cfg.recipe(), seeds=seeds, **kw)
            per_student = [statistics.median(h["seconds"] for h in runs[0].history[1:]) / len(seeds)]
        else:
            runs = [fit(m, source, None, cfg.recipe(), seed=s, **kw) for m, s in zip(models, seeds)]
            per_student = [statistics.median(h["seconds"] for h in r.history[1:]) for r in runs]
        return 1000 * statistics.fmean(per_student), source.ops // len(seeds)

    for student in args.students:
        ms: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode, switches in MODES.items():
                ms[mode].append(train(student, switches, args.epochs)[0])
        med = {m: statistics.median(v) for m, v in ms.items()}
        base = med["micro-batch forwards"]
        cells = " | ".join(f"{v:.1f}" for v in med.values())
        print(f"| {student} | {cells} | {min(med.values()) / base:.2f} |", flush=True)
    if args.ops:
        print()
        print("Working operators per student-epoch (epoch 2 profiled; proxy for GPU kernel launches):")
        print()
        print("| student | " + " | ".join(MODES) + " |")
        print("|---|" + "---:|" * len(MODES))
        for student in args.students:
            counts = [train(student, switches, 2, profile_epoch=1)[1] for switches in MODES.values()]
            print(f"| {student} | " + " | ".join(f"{c:,}" for c in counts) + " |", flush=True)


class Profiled:
    """A batch source that profiles one epoch (whole steps: the profile closes when the next batch is asked for)."""

    def __init__(self, source: Any, epoch: int) -> None:
        self.source, self.profile_epoch, self.ops = source, epoch, 0
        self.steps_per_epoch, self.num_samples = source.steps_per_epoch, source.num_samples

    def epoch(self, epoch: int, generator: Any) -> Iterator[Any]:
        if epoch != self.profile_epoch:
            yield from self.source.epoch(epoch, generator)
            return
        from torch.profiler import ProfilerActivity, profile

        from bench_ops import working_ops

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield from self.source.epoch(epoch, generator)
        self.ops += sum(working_ops(prof).values())


if __name__ == "__main__":
    main()
