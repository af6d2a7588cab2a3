"""Host memory of recover's initialisation at 224 px: patch scoring of one class, and the initial-image store.

Two measurements, each in a fresh subprocess that prints its own ``ru_maxrss`` (so the figures do not mix), run
for the code in this checkout and, with ``--code``, another checkout's ``src``:

* ``patches``: ``patch_init`` of one class at 224 px with recover's defaults (300 candidate images, 5 crops each,
  2x2 mosaics), scored by torchvision's ResNet-18 (random weights: memory does not depend on them). Peak RSS
  above the process's RSS before the call.
* ``store``: ``recover_images`` with real initialisation over ``--classes`` classes at IPC ``--ipc``, one IPC
  index per unit (each class revisited IPC times, as ImageNet-1K's preset does) and ``--classes-per-block``
  classes per unit (small units, so that the units' own working memory does not hide the store), one iteration
  per unit with a small expert. Peak RSS above the RSS before the call; the initial images of every class are
  ``classes x ipc x 150,528`` bytes.

The images are random uint8 tensors (memory does not depend on their content).

    python bench/bench_init224.py                           # this checkout
    python bench/bench_init224.py --code /tmp/old/src       # and another one, in the same table
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
from typing import Any

MARK = "BENCH_INIT224_JSON "


def _dataset(classes: int, per_class: int) -> Any:  # a RealDataset (cvdd is imported in the child only)
    import torch

    from cvdd.data.sources import RealDataset, TensorSplit
    from cvdd.data.specs import DatasetSpec, known_constants

    spec = DatasetSpec(
        name="imagenet1k", classes=tuple(f"c{i:04d}" for i in range(classes)), **known_constants("imagenet1k")
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, 224, 224), dtype=torch.uint8, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    split = TensorSplit(images, labels)
    return RealDataset(spec, split, split, "random", "random")


def child(what: str, classes: int, ipc: int, per_block: int) -> None:
    """Run one measurement and print it as one JSON line."""
    import torch

    from cvdd.benchkit import rss_mib
    from cvdd.device import peak_rss_mib
    from cvdd.models import create_model

    torch.manual_seed(0)
    if what == "patches":
        from cvdd.synthesis.init import patch_init

        data = _dataset(1, 300)
        observer = create_model("resnet18", 1000, 224).eval()
        before = rss_mib()
        t0 = time.perf_counter()
        patch_init(data, 0, 10, observer, seed=0, candidates=300, crops=5, factor=2)
    else:
        from cvdd.distributed import Shard
        from cvdd.experts import Expert
        from cvdd.synthesis.recover import RecoverConfig, recover_images

        data = _dataset(classes, ipc)
        model = create_model("convnet_d3_w32", classes, 224).eval()
        experts = [Expert("convnet_d3_w32", "convnet_d3_w32", model, {"test_acc": 0.5}, data.spec)]
        cfg = RecoverConfig(
            ipc=ipc, committee_size=1, iterations=1, init="real", ipc_per_block=1, classes_per_block=per_block
        )
        before = rss_mib()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            recover_images(experts, cfg, out, data=data, seed=0, device="cpu", progress=False, shard=Shard(0, 1))
    seconds = time.perf_counter() - t0
    print(MARK + json.dumps({"what": what, "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "before_mib": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", nargs="*", default=[], help="other checkouts' src folders to measure too")
    parser.add_argument("--classes", type=int, default=100, help="classes of the store measurement (default 100)")
    parser.add_argument("--ipc", type=int, default=10, help="IPC of the store measurement (default 10)")
    parser.add_argument("--classes-per-block", type=int, default=10, help="classes per unit (default 10)")
    parser.add_argument("--only", choices=["patches", "store"], default=None, help="run one measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.classes, args.ipc, args.classes_per_block)
        return
    here = str(Path(__file__).resolve().parents[1] / "src")
    store_mib = args.classes * args.ipc * 3 * 224 * 224 / 2**20
    print(f"store: {args.classes} classes x IPC {args.ipc}: initial images {store_mib:.0f} MiB (uint8)")
    print("| code | measurement | peak RSS MiB | above start MiB | s |")
    print("|---|---|---:|---:|---:|")
    for code in [here, *args.code]:
        for what in [args.only] if args.only else ["patches", "store"]:
            env = {**os.environ, "PYTHONPATH": code}
            cmd = [sys.executable, __file__, "--child", what, "--classes", str(args.classes), "--ipc", str(args.ipc)]
            cmd += ["--classes-per-block", str(args.classes_per_block)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK) :])
            name = "this checkout" if code == here else code
            print(
                f"| {name} | {what} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['before_mib']:.0f} "
                f"| {r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
