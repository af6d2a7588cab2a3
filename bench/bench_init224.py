"""Host memory at 224 px of recover's initialisation (patch scoring of one class, the initial-image store) and
of holding a synthetic set for evaluation.

Three measurements, each in a fresh subprocess that prints its own ``ru_maxrss`` (so the figures do not mix), run
for the code in this checkout and, with ``--code``, another checkout's ``src``:

* ``patches``: ``patch_init`` of one class at 224 px with recover's defaults (300 candidate images, 5 crops each,
  2x2 mosaics), scored by torchvision's ResNet-18 (random weights: memory does not depend on them). Peak RSS
  above the process's RSS before the call.
* ``store``: ``recover_images`` with real initialisation over ``--classes`` classes at IPC ``--ipc``, one IPC
  index per unit (each class revisited IPC times, as ImageNet-1K's preset does) and ``--classes-per-block``
  classes per unit (small units, so that the units' own working memory does not hide the store), one iteration
  per unit with a small expert. Peak RSS above the RSS before the call; the initial images of every class are
  ``classes x ipc x 150,528`` bytes.
* ``evaluate``: a ``store=uint8`` synthetic set of ``--classes`` x ``--ipc`` images at 224 px (written before the
  measurement starts) loaded with ``load_synthetic`` and made ready for students as ``cvdd evaluate`` does
  (``_prepare``: the device copy, the set's digest), then one epoch of its batches cut (random-resized crops,
  CutMix; no student, whose memory does not depend on how the set is held). Peak RSS above the RSS before loading.

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


def child(what: str, classes: int, ipc: int, per_block: int, set_path: str) -> None:
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
    elif what == "write-set":  # the evaluate measurement's file, written in a process of its own
        from cvdd.artifacts import base_metadata, save_tensors
        from cvdd.synthesis.recover import SYNTHETIC_KIND

        gen = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (classes * ipc, 3, 224, 224), dtype=torch.uint8, generator=gen)
        labels = torch.arange(classes).repeat_interleave(ipc)
        meta = {**base_metadata(SYNTHETIC_KIND, _dataset(classes, 1).spec), "ipc": ipc}
        save_tensors(set_path, {"images": pixels, "labels": labels}, meta)
        return
    elif what == "evaluate":
        from cvdd.evaluation.student import EvalConfig, EvalJob, _prepare
        from cvdd.synthesis.recover import load_synthetic

        spec = _dataset(classes, 1).spec
        cfg = EvalConfig(student="convnet_d3_w32", epochs=1, label_mode="hard", seeds=[0])
        before = rss_mib()
        t0 = time.perf_counter()
        images, labels, _ = load_synthetic(set_path, spec)
        ready = _prepare(EvalJob(images, labels, cfg), spec, torch.device("cpu"), False, {})
        for _batch in ready.source.epoch(0, torch.Generator().manual_seed(0)):
            pass
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
    parser.add_argument("--classes", type=int, default=100, help="classes of store and evaluate (default 100)")
    parser.add_argument("--ipc", type=int, default=10, help="IPC of store and evaluate (default 10)")
    parser.add_argument("--classes-per-block", type=int, default=10, help="classes per unit (default 10)")
    parser.add_argument("--only", choices=["patches", "store", "evaluate"], default=None, help="run one measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--set-path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.classes, args.ipc, args.classes_per_block, args.set_path)
        return
    tmp = tempfile.TemporaryDirectory()
    set_path = str(Path(tmp.name) / "synthetic.safetensors")
    sizes = ["--classes", str(args.classes), "--ipc", str(args.ipc), "--classes-per-block", str(args.classes_per_block)]
    if args.only in (None, "evaluate"):
        subprocess.run([sys.executable, __file__, "--child", "write-set", *sizes, "--set-path", set_path], check=True)
    here = str(Path(__file__).resolve().parents[1] / "src")
    store_mib = args.classes * args.ipc * 3 * 224 * 224 / 2**20
    print(f"store/evaluate: {args.classes} classes x IPC {args.ipc}: {store_mib:.0f} MiB of uint8 pixels")
    print("| code | measurement | peak RSS MiB | above start MiB | s |")
    print("|---|---|---:|---:|---:|")
    for code in [here, *args.code]:
        for what in [args.only] if args.only else ["patches", "store", "evaluate"]:
            env = {**os.environ, "PYTHONPATH": code}
            cmd = [sys.executable, __file__, "--child", what, *sizes, "--set-path", set_path]
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
