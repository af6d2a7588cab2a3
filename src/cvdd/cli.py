"""Command line: ``cvdd <subcommand>``. Parsing only; the work is done by :mod:`cvdd.api`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cvdd import __version__
from cvdd.errors import CvddError

log = logging.getLogger("cvdd")


def _add_common(p: argparse.ArgumentParser, compute: bool = True) -> None:
    """Options shared by every subcommand; ``compute=False`` (report, merge, export, info, models, presets) leaves out
    --device, --seed and --track, which would be accepted there and do nothing."""
    g = p.add_argument_group("common options")
    if compute:
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CVDD_DEVICE or CUDA if available)")
        g.add_argument("--seed", type=int, default=0, help="run seed; the same seed gives the same result (default 0)")
    g.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="only warnings and errors, no progress bars (TQDM_DISABLE=1: no bars, logs kept)",
    )
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    if compute:
        g.add_argument(
            "--track",
            default=None,
            metavar="TRACKER",
            help="log curves to tensorboard[:DIR] or wandb[:PROJECT] (needs that package; also CVDD_TRACK)",
        )


def _add_experts_data(p: argparse.ArgumentParser) -> None:
    """--dataset/--data/--cache-dir of the commands that read the experts' own dataset by default."""
    p.add_argument("--dataset", default=None, help="real dataset (default: the experts')")
    p.add_argument("--data", default=None, metavar="PATH", help="where a named dataset lives")
    p.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default: CVDD_CACHE or ~/.cache/cvdd)")


def _add_data(p: argparse.ArgumentParser, dataset_default: str | None = "digits") -> None:
    """``dataset_default`` None: the subcommand takes the experts' dataset when --dataset is not given."""
    g = p.add_argument_group("data")
    default_text = "digits" if dataset_default else "the dataset the experts were squeezed on"
    g.add_argument(
        "--dataset",
        default=dataset_default,
        help="digits (embedded), cifar10, cifar100, tiny-imagenet, imagenette, imagenet1k, or a PATH "
        f"to an ImageFolder folder or .tar/.tar.gz with train/ and test/ (or val/) (default: {default_text})",
    )
    g.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="where a named dataset lives (ImageFolder folder or tarball; torchvision root for CIFAR)",
    )
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10/100 if missing")
    g.add_argument("--cache-dir", default=None, help="decoded-dataset cache (default: CVDD_CACHE or ~/.cache/cvdd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvdd",
        description="Dataset distillation by committee voting (CV-DD): squeeze experts on real data, recover "
        "synthetic images with a voting committee, relabel with batch-specific soft labels, and "
        "evaluate honestly.",
    )
    parser.add_argument("--version", action="version", version=f"cvdd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "squeeze",
        help="train expert classifiers (the committee) on a real dataset",
        description="Train one expert per architecture and store safetensors weights plus JSON "
        "metadata (architecture, dataset classes, test top-1, recipe, seed, wall time). "
        "Finished experts are reused; a killed run resumes from its last epoch checkpoint (written at most once a "
        "minute, --set checkpoint_every_s=0 for every epoch).",
    )
    _add_data(p)
    p.add_argument(
        "--arch",
        nargs="+",
        default=None,
        metavar="NAME",
        help="architectures to train (default: the preset's); see `cvdd models`",
    )
    p.add_argument("--out", default="runs/experts", help="output folder (default: runs/experts)")
    p.add_argument(
        "--preset",
        default=None,
        help="recipe preset (default: the dataset's own: for CIFAR-10 the paper's five networks for 200 epochs, a "
        "GPU job; pass cifar10-cpu on a CPU); see `cvdd presets`",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the preset's number of epochs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set lr=0.1 --set batch_size=256 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="retrain experts that are already finished")
    _add_common(p)

    p = sub.add_parser(
        "recover",
        help="synthesise images with a voting committee of experts (CV-DD / SRe2L++)",
        description="Optimise IPC synthetic images per class so that N experts of the committee, "
        "weighted by softmax(prior / T), classify them while each expert's BatchNorm "
        "input statistics match its running statistics. --committee-size 1 is SRe2L++. "
        "Units are written as they finish; a re-run resumes.",
    )
    p.add_argument("--experts", default="runs/experts", help="folder of squeezed experts (default: runs/experts)")
    p.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="NAME",
        help="which experts of the folder form the pool, in this order (default: all, by name)",
    )
    p.add_argument("--out", default="runs/synthetic", help="output folder (default: runs/synthetic)")
    p.add_argument("--ipc", type=int, default=None, help="images per class (default: the preset's)")
    p.add_argument("--committee-size", type=int, default=None, help="N voters per IPC index (default 2; 1 = SRe2L++)")
    p.add_argument(
        "--committee",
        default=None,
        choices=["auto", "pairs", "random", "fixed", "single"],
        help="committee policy per IPC index (default: the preset's; auto: pairs while IPC <= C(M,N), else random)",
    )
    p.add_argument(
        "--voting",
        default=None,
        choices=["prior", "equal", "random"],
        help="voter weights (default prior: softmax(prior / T), T = 5)",
    )
    p.add_argument("--iterations", type=int, default=None, help="optimisation steps per unit")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (cosine-decayed)")
    p.add_argument(
        "--init",
        default=None,
        choices=["patches", "real", "gaussian"],
        help="initialisation (default: the preset's; patches: RDED-style real crops scored by an observer expert, "
        "real: random real images)",
    )
    p.add_argument("--preset", default=None, help="recover preset (default: the dataset's own); see `cvdd presets`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recover option, e.g. --set r_bn=0.05 --set ipc_per_block=10",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard finished units made with another configuration (default: refuse to mix)",
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only every N-th unit from unit I (0-based), for job arrays; all shards share --out, and "
        "`cvdd merge OUT` assembles them (under torchrun the ranks shard automatically)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="real data for the initialisation (default: the dataset the experts were squeezed on)",
    )
    p.add_argument("--data", default=None, metavar="PATH", help="where a named dataset lives")
    p.add_argument("--cache-dir", default=None, help="decoded-dataset cache")
    _add_common(p)

    p = sub.add_parser(
        "ablate",
        help="compare configurations on a validation split carved from the training set",
        description="Run a grid of recover/evaluate configurations (presets/ablate.yaml or a YAML file) on a "
        "validation split carved from the training set, several seeds each, and write a table with mean ± std "
        "and the gain over random real images (ablation-validation.md/.json). --final NAME... then evaluates "
        "the chosen configurations' same synthetic sets once on the real test split (ablation-test.md).",
    )
    _add_data(p, dataset_default=None)
    p.add_argument("--experts", required=True, help="folder of squeezed experts (pool and teacher)")
    p.add_argument(
        "--grid", default=None, help="shipped grid name or a .yaml file (default: digits for digits, else cifar10-cpu)"
    )
    p.add_argument(
        "--preset",
        default=None,
        help="distill preset: recover preset and evaluation recipe (default: digits for digits, else cifar10-cpu)",
    )
    p.add_argument("--ipc", type=int, default=10, help="images per class (default 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the preset's)")
    p.add_argument("--val-per-class", type=int, default=100, help="validation images per class (default 100)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these configurations")
    p.add_argument("--final", nargs="+", default=None, metavar="NAME", help="evaluate these on the test split")
    p.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    _add_common(p)

    p = sub.add_parser(
        "report",
        help="write an HTML (and Markdown) report of a distill run",
        description="Write RUN_DIR/report/report.html and report.md: the results table (mean ± std, IOR, "
        "HLR), image grids of every method next to random real images, accuracy against IPC, recover loss "
        "curves per expert, voter weights, time per stage, the resolved config and versions.",
    )
    p.add_argument("run_dir", help="a `cvdd distill` output folder (with results.json)")
    p.add_argument("--out", default=None, help="report folder (default: RUN_DIR/report)")
    _add_common(p, compute=False)

    p = sub.add_parser(
        "merge",
        help="assemble a recover run made by independent shards (--shard I/N)",
        description="Check that every unit listed in OUT/recover.json is finished (same config hash, valid "
        "checksum) and assemble them into OUT/synthetic.safetensors and grid.png.",
    )
    p.add_argument("out", help="the --out folder shared by the recover shards")
    _add_common(p, compute=False)

    p = sub.add_parser(
        "export",
        help="write a synthetic set as PNG/JPEG ImageFolder, npz, safetensors or Hugging Face imagefolder",
        description="Export synthetic.safetensors (pixels rounded to uint8, class-major). png: "
        "<out>/<class>/<class>_<ipc>.png (lossless); jpeg: the same as JPEG quality 75, as the official code; "
        "npz: images uint8 (N, H, W, 3), labels, classes; safetensors: images uint8 (N, 3, H, W) and labels, "
        "class names in the header; hf: <out>/train/<class>/*.png for Hugging Face "
        'load_dataset("imagefolder", data_dir=OUT). The destination must not exist yet.',
    )
    p.add_argument("synthetic", help="synthetic.safetensors or the recover output folder")
    p.add_argument("--out", required=True, help="destination folder (npz/safetensors: a file, or OUT/images.<format>)")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "npz", "safetensors", "hf"])
    _add_common(p, compute=False)

    p = sub.add_parser(
        "relabel",
        help="store per-epoch soft labels from the teacher (BSSL) for a synthetic set",
        description="Soft labels from one expert or the prior-weighted committee (softmax(prior/10)), "
        "with Batch-Specific Soft Labelling: the teacher's BN uses the statistics of each "
        "student micro-batch. One file per epoch holds the augmentation plan (crops, flips, "
        "CutMix) and the logits (fp16). Prints the bytes stored.",
    )
    p.add_argument(
        "synthetic",
        help="recover output folder, synthetic.safetensors, random-real, a folder of class sub-folders of images "
        "or a `cvdd export` .npz/.safetensors file (as evaluate)",
    )
    p.add_argument("--experts", default="runs/experts", help="folder of experts (the teacher)")
    p.add_argument(
        "--out",
        default=None,
        help="labels folder (default: labels/ beside the synthetic set; random-real: runs/random-real-ipc<N>/labels)",
    )
    p.add_argument("--ipc", type=int, default=None, help="images per class (random-real only)")
    p.add_argument(
        "--teacher", default=None, help="committee or one expert's name (default: the preset's; paper: resnet18)"
    )
    p.add_argument("--no-bssl", action="store_true", help="teacher BN uses its running statistics")
    p.add_argument("--preset", default=None, help="distill preset whose evaluation recipe sets epochs and batches")
    p.add_argument(
        "--label-seed",
        type=int,
        default=None,
        help="seed of the per-epoch augmentation plans (default: the recipe's first student seed; evaluate replays "
        "the labels of its first --seeds value, so pass the same seed there)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set epochs=100 --set topk=5 --set label_dtype=fp32",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard labels in the folder made for another set, teacher or settings (default: refuse them)",
    )
    _add_experts_data(p)
    _add_common(p)

    p = sub.add_parser(
        "evaluate",
        help="train students on a synthetic set and report real test top-1",
        description="Train one student per seed on a synthetic set (or the random-real baseline) "
        "with soft labels (online or stored, BSSL teacher) or hard labels, and report top-1 "
        "on the real test set at the final epoch as mean ± std.",
    )
    p.add_argument(
        "synthetic",
        help="recover output folder, synthetic.safetensors, random-real, a folder of class sub-folders of "
        "images named like the dataset's classes (<folder>/<class>/*.png, or <folder>/train/<class>/), "
        "or a `cvdd export` .npz/.safetensors file",
    )
    p.add_argument("--experts", default="runs/experts", help="folder of experts (the teacher)")
    p.add_argument("--ipc", type=int, default=None, help="images per class (random-real only)")
    p.add_argument("--student", default=None, help="student architecture (default: the preset's)")
    p.add_argument("--labels", default=None, choices=["online", "stored", "hard"], help="label mode")
    p.add_argument(
        "--label-dir",
        default=None,
        metavar="DIR",
        help="stored labels' folder, e.g. the --out of `cvdd relabel` (default: labels/ beside the synthetic set)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs")
    p.add_argument(
        "--teacher", default=None, help="committee or one expert's name (default: the preset's; paper: resnet18)"
    )
    p.add_argument("--no-bssl", action="store_true", help="teacher BN uses its running statistics")
    p.add_argument(
        "--checkpoints",
        default=None,
        metavar="DIR",
        help="keep each student's epoch checkpoint here (at most one a minute; --set checkpoint_every_s=0: every "
        "epoch); a killed evaluation resumes from it",
    )
    p.add_argument("--preset", default=None, help="distill preset whose evaluation recipe is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    _add_experts_data(p)
    _add_common(p)

    p = sub.add_parser(
        "distill",
        help="the whole pipeline with baselines: squeeze, recover, relabel, evaluate",
        description="Squeeze (or reuse) experts, recover synthetic sets for random-real, SRe2L++ and "
        "CV-DD at each IPC, evaluate each under the identical recipe and teacher over "
        "several seeds, and write results.json, results.md (with IOR and HLR), image grids "
        "and the resolved config. With no arguments: the embedded digits dataset.",
    )
    _add_data(p)
    p.add_argument("--out", default="runs/distill", help="run folder (default: runs/distill)")
    p.add_argument(
        "--preset",
        default=None,
        help="distill preset (default: digits for the embedded digits; other datasets need one: cifar10-cpu on a "
        "CPU, the paper's <dataset>-ipc<N> on a GPU); see `cvdd presets`",
    )
    p.add_argument("--methods", nargs="+", default=None, choices=["random-real", "sre2l++", "cvdd"])
    p.add_argument("--ipc", type=int, nargs="+", default=None, help="images per class (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="student seeds (default: the preset's)")
    p.add_argument("--experts", default=None, help="reuse experts from this folder")
    p.add_argument("--no-report", action="store_true", help="skip the HTML/Markdown report (RUN_DIR/report)")
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard recover units and stored labels made with another configuration (after `cvdd prior` or a "
        "changed --set recover.*); default: refuse to mix. Finished work that still matches is kept",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=STAGE_SET_HELP,
    )
    _add_common(p)

    p = sub.add_parser(
        "prior",
        help="measure each expert's voting prior and store it in its metadata",
        description="For each expert: SRe2L++ recovery with that expert alone at a small IPC, soft "
        "labels from the equally weighted committee, and a student's top-1 on held-out real *training* "
        "images (never the test set). The value (percent) becomes the expert's prior in recover's voting "
        "and the relabel committee's weights, replacing the training accuracy of its last squeeze epoch. "
        "Needs images of at most 64 px.",
    )
    p.add_argument("--experts", default="runs/experts", help="folder of experts (default runs/experts)")
    p.add_argument("--ipc", type=int, default=1, help="images per class recovered per expert (default 1)")
    p.add_argument("--preset", default=None, help="distill preset whose recover preset and evaluation recipe are used")
    p.add_argument(
        "--out",
        default=None,
        help="keep each expert's recovered set and labels here (default: a temporary folder, removed afterwards); "
        "a rerun reuses them, so measure other settings in another folder",
    )
    p.add_argument(
        "--val-per-class",
        type=int,
        default=100,
        help="real training images per class held out to score the students (default 100)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the recovery (recover.KEY) or of the students' recipe (evaluate.KEY or a bare KEY)",
    )
    _add_experts_data(p)
    _add_common(p)

    p = sub.add_parser(
        "bench",
        help="run a benchmark preset end to end and write a report with machine and timings",
        description="Run `distill` with a benchmark preset (cifar10-cpu: the CPU committee on real "
        "CIFAR-10; cifar10-gpu: the paper's architectures and recipe) and write "
        "<out>/bench.md with the command, machine, package versions and wall time per stage. "
        "With --suite speed: time every stage (squeeze, recover, relabel, evaluate) against a deliberately naive "
        "reference pipeline on the same data and models and print one Markdown table per stage (throughput, "
        "peak memory, share of time inside the models, cvdd / naive ratio), also written to <out>/speed.md "
        "(or to --out itself when it ends in .md); --set KEY=VALUE sets the suite's fields (cvdd.speed.SpeedConfig: "
        "train_per_class, epochs, recover_iterations, stages, naive_workers, ...).",
    )
    p.add_argument(
        "--suite",
        default="pipeline",
        choices=["pipeline", "speed"],
        help="pipeline: distill end to end (default); speed: per-stage speed against a naive reference",
    )
    p.add_argument("--preset", default="cifar10-cpu", help="distill preset (default cifar10-cpu)")
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="CIFAR-10 as an ImageFolder folder or tarball (required by the pipeline suite; the speed suite "
        "defaults to $CVDD_CIFAR10_TAR or ../shared/data/cifar10-jpeg.tar.gz)",
    )
    p.add_argument("--out", default="runs/bench", help="run folder (default: runs/bench)")
    p.add_argument(
        "--budget",
        default="full",
        choices=["full", "small"],
        help="small: first IPC and first seed only, and the preset's small_budget (default: 50 student epochs; "
        "cifar10-gpu also shortens squeeze and recover to fit minutes on one GPU)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=["random-real", "sre2l++", "cvdd"],
        help="override the preset's methods (pipeline suite)",
    )
    p.add_argument("--ipc", type=int, nargs="+", default=None, help="override the preset's IPCs")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    p.add_argument("--experts", default=None, help="reuse experts from this folder")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline suite: " + STAGE_SET_HELP + "; speed suite: a cvdd.speed.SpeedConfig field",
    )
    _add_common(p)

    p = sub.add_parser(
        "info",
        help="describe a cvdd artifact (expert, synthetic set, labels, distill run)",
        description="Print the kind, dataset, classes and the key fields of any artifact cvdd wrote.",
    )
    p.add_argument("artifact", help="a .safetensors/.json file or an output folder")
    _add_common(p, compute=False)

    p = sub.add_parser(
        "models",
        help="list the registered architectures",
        description="Print every architecture with its input sizes, parameter count and MFLOPs of one forward pass.",
    )
    p.add_argument("--num-classes", type=int, default=10, help="classes for the parameter count (default 10)")
    p.add_argument("--image-size", type=int, default=None, help="only this input size")
    _add_common(p, compute=False)

    p = sub.add_parser(
        "presets",
        help="list the shipped presets",
        description="List every squeeze, recover and distill preset, one line each: the main settings and a "
        "description. Paper presets are named per dataset and IPC (cifar100-ipc10); CPU presets end in -cpu.",
    )
    p.add_argument("filter", nargs="?", default=None, help="only presets whose name contains this text")
    _add_common(p, compute=False)
    return parser


def _hide_no_cuda_notice(record: logging.LogRecord) -> bool:
    """torch.compile on a CPU-only machine with a CUDA build of PyTorch logs "No CUDA runtime is found" as a warning
    at every run; it is harmless there (compiled experts on a CPU need no CUDA), and users read warnings as problems.
    """
    return not record.getMessage().startswith("No CUDA runtime is found")


def _setup_logging(args: argparse.Namespace) -> bool:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    torch_ext = logging.getLogger("torch.utils.cpp_extension")
    if args.verbose:
        torch_ext.removeFilter(_hide_no_cuda_notice)
    else:
        torch_ext.addFilter(_hide_no_cuda_notice)  # the same function is added once, however often main() runs
    # TQDM_DISABLE is tqdm's own switch; cvdd passes `disable=` explicitly, which tqdm lets win, so honour it here.
    tqdm_off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")
    return not args.quiet and not tqdm_off


def _cmd_squeeze(args: argparse.Namespace, progress: bool) -> int:
    from cvdd.api import squeeze
    from cvdd.config import parse_override

    overrides = dict(parse_override(s) for s in args.set)
    results = squeeze(
        args.dataset,
        archs=args.arch,
        out=args.out,
        data=args.data,
        preset=args.preset,
        epochs=args.epochs,
        overrides=overrides,
        seed=args.seed,
        device=args.device,
        force=args.force,
        cache_dir=args.cache_dir,
        download=args.download,
        progress=progress,
    )
    print(f"{'expert':<18} {'test top-1':>10} {'seconds':>9} {'img/s':>8}  file")
    for r in results:
        note = " (reused)" if r.skipped else ""
        print(f"{r.name:<18} {100 * r.test_acc:>9.2f}% {r.seconds:>9.1f} {r.images_per_s:>8.0f}  {r.path}{note}")
    return 0


def _cmd_recover(args: argparse.Namespace, progress: bool) -> int:
    from cvdd.api import recover
    from cvdd.config import parse_override
    from cvdd.distributed import Shard

    overrides = dict(parse_override(s) for s in args.set)
    res = recover(
        args.experts,
        args.out,
        ipc=args.ipc,
        committee_size=args.committee_size,
        committee=args.committee,
        voting=args.voting,
        iterations=args.iterations,
        lr=args.lr,
        init=args.init,
        preset=args.preset,
        pool=args.pool,
        overrides=overrides,
        dataset=args.dataset,
        data=args.data,
        seed=args.seed,
        device=args.device,
        restart=args.restart,
        cache_dir=args.cache_dir,
        progress=progress,
        shard=Shard.parse(args.shard) if args.shard else None,
    )
    return _print_recover(res)


def _cmd_ablate(args: argparse.Namespace, progress: bool) -> int:
    from pathlib import Path

    from cvdd.api import ablate

    rows = ablate(
        args.dataset,
        args.experts,
        args.out,
        data=args.data,
        grid=args.grid,
        preset=args.preset,
        ipc=args.ipc,
        seeds=args.seeds,
        val_per_class=args.val_per_class,
        only=args.only,
        final=args.final,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
        download=args.download,
        progress=progress,
    )
    split = rows[0]["split"] if rows else "validation"
    print((Path(args.out) / f"ablation-{split}.md").read_text())
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cvdd.api import report

    paths = report(args.run_dir, args.out)
    print(f"report: {paths['html']} (Markdown: {paths['md']}; {len(paths) - 2} figures)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from cvdd.api import merge

    return _print_recover(merge(args.out))


def _print_recover(res: Any) -> int:
    from cvdd import distributed as dd

    if not dd.is_main():
        return 0
    if res.path is None:
        print(
            f"{res.units_run} units optimised in {res.seconds:.1f} s; {res.units_missing} units are left to other "
            f"shards: run `cvdd merge` on the output folder once they finish"
        )
        return 0
    m = res.meta
    print(
        f"{m['method']}: {len(res.labels)} images ({m['ipc']} per class, {len(m['dataset']['classes'])} classes), "
        f"committee policy {m['committee_policy']}, voting {m['config']['voting']}"
    )
    for k, (members, weights) in enumerate(zip(m["committees"], m["weights"])):
        if k < 10:
            print(f"  IPC {k}: " + ", ".join(f"{n} {w:.3f}" for n, w in zip(members, weights)))
    accs = {}
    for u in m["units"]:
        for n, a in u["expert_accuracy"].items():
            accs.setdefault(n, []).append(a)
    print(
        "  experts' top-1 on the final images: "
        + ", ".join(f"{n} {100 * sum(a) / len(a):.1f}%" for n, a in accs.items())
    )
    print(
        f"  {res.units_run} units optimised in {res.seconds:.1f} s -> {res.path} (grid: {res.path.parent / 'grid.png'})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cvdd.api import export
    from cvdd.synthesis.export import export_path

    n = export(args.synthetic, args.out, format=args.format)
    print(f"wrote {n} images ({args.format}) to {export_path(args.out, args.format)}")
    return 0


STAGE_SET_HELP = (
    "override a field of one stage: squeeze.KEY (the experts' recipe), recover.KEY, evaluate.KEY or a bare KEY "
    "(evaluation), e.g. --set epochs=30 --set recover.iterations=500 --set squeeze.epochs=10 (repeatable)"
)


def stage_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Split the ``--set`` values of ``distill`` and ``bench`` by stage.

    Args:
        items: ``KEY=VALUE`` strings; ``squeeze.KEY``, ``recover.KEY`` and ``evaluate.KEY`` address that stage, a
            bare ``KEY`` the evaluation recipe (as before stages could be named).

    Returns:
        ``{"squeeze": {...}, "recover": {...}, "evaluate": {...}}``, values parsed as YAML. The fields themselves are
        checked by the stage's configuration (an unknown one is a one-line error naming it).

    Raises:
        ConfigError: an unknown stage prefix, or a field the pipeline sets itself (``recover.ipc``).
    """
    from cvdd.config import parse_override
    from cvdd.errors import ConfigError
    from cvdd.pipeline import check_recover_overrides

    out: dict[str, dict[str, Any]] = {"squeeze": {}, "recover": {}, "evaluate": {}}
    for item in items:
        key, value = parse_override(item)
        stage, dot, name = key.partition(".")
        if not dot:
            stage, name = "evaluate", key
        if stage not in out or not name:
            raise ConfigError(f"--set {key}: unknown stage {stage!r}; write squeeze.KEY, recover.KEY or evaluate.KEY")
        out[stage][name] = value
    # The pipeline refuses the recover fields it sets itself; checked here too, before the dataset is loaded.
    check_recover_overrides(out["recover"])
    return out


def _eval_overrides(args: argparse.Namespace) -> dict:
    from cvdd.config import parse_override

    over = dict(parse_override(s) for s in args.set)
    for key, value in (
        ("student", getattr(args, "student", None)),
        ("label_mode", getattr(args, "labels", None)),
        ("seeds", getattr(args, "seeds", None)),
        ("epochs", getattr(args, "epochs", None)),
        ("teacher", getattr(args, "teacher", None)),
    ):
        if value is not None:
            over[key] = value
    if getattr(args, "no_bssl", False):
        over["bssl"] = False
    return over


def _cmd_relabel(args: argparse.Namespace, progress: bool) -> int:
    from cvdd.api import relabel

    info = relabel(
        args.synthetic,
        args.experts,
        args.out,
        ipc=args.ipc,
        preset=args.preset,
        overrides=_eval_overrides(args),
        dataset=args.dataset,
        data=args.data,
        cache_dir=args.cache_dir,
        seed=args.seed,
        label_seed=args.label_seed,
        device=args.device,
        progress=progress,
        restart=args.restart,
    )
    print(
        f"stored soft labels: {info['files']} files, {info['bytes']:,} bytes, {info['seconds']:.1f} s; teacher "
        f"{', '.join(info['ident']['teacher']['experts'])} (BSSL {info['ident']['teacher']['bssl']})"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace, progress: bool) -> int:
    from cvdd.api import evaluate
    from cvdd.reporting import mean_std

    res = evaluate(
        args.synthetic,
        args.experts,
        ipc=args.ipc,
        preset=args.preset,
        overrides=_eval_overrides(args),
        label_dir=args.label_dir,
        dataset=args.dataset,
        data=args.data,
        cache_dir=args.cache_dir,
        seed=args.seed,
        device=args.device,
        progress=progress,
        checkpoints=args.checkpoints,
    )
    accs = ", ".join(f"{100 * a:.2f}" for a in res.accs)
    print(
        f"top-1 on the real test set: {mean_std(res.mean, res.std, len(res.seeds))}% over seeds {res.seeds} ({accs}); "
        f"{res.seconds:.1f} s" + (f"; soft labels stored: {res.label_bytes:,} bytes" if res.label_bytes else "")
    )
    return 0


def _cmd_distill(args: argparse.Namespace, progress: bool) -> int:
    from pathlib import Path

    from cvdd import distributed as dd
    from cvdd.api import distill

    stages = stage_overrides(args.set)
    distill(
        args.dataset,
        args.out,
        data=args.data,
        preset=args.preset,
        methods=args.methods,
        ipcs=args.ipc,
        seeds=args.seeds,
        overrides=stages["evaluate"],
        recover_overrides=stages["recover"],
        squeeze_overrides=stages["squeeze"],
        experts=args.experts,
        seed=args.seed,
        device=args.device,
        cache_dir=args.cache_dir,
        download=args.download,
        progress=progress,
        restart=args.restart,
    )
    if not dd.is_main():
        return 0
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}; image grids: {Path(args.out)}/<method>/ipc<N>/grid.png")
    if not args.no_report:
        from cvdd.api import report

        paths = report(args.out)
        print(f"report: {paths['html']} (open it in a browser; Markdown: {paths['md']})")
    return 0


def _cmd_prior(args: argparse.Namespace, progress: bool) -> int:
    from cvdd.api import prior
    from cvdd.errors import ConfigError

    stages = stage_overrides(args.set)
    if stages["squeeze"]:
        raise ConfigError(f"--set squeeze.{next(iter(stages['squeeze']))}: prior trains no experts; it measures them")
    priors = prior(
        args.experts,
        ipc=args.ipc,
        preset=args.preset,
        overrides=stages["evaluate"],
        recover_overrides=stages["recover"],
        val_per_class=args.val_per_class,
        out=args.out,
        dataset=args.dataset,
        data=args.data,
        cache_dir=args.cache_dir,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    for name, value in priors.items():
        print(f"{name:<18} prior {value:.2f}%  (written to {args.experts}/{name}.json)")
    return 0


def _cmd_bench(args: argparse.Namespace, progress: bool) -> int:
    import os
    import platform
    import shlex
    import time
    from pathlib import Path

    import torch

    from cvdd.api import distill
    from cvdd.pipeline import get_distill_preset

    if args.suite == "speed":
        from cvdd.config import parse_override
        from cvdd.speed import run_speed_suite, speed_config

        if args.methods or args.seeds:
            from cvdd.errors import ConfigError

            raise ConfigError(
                "bench --suite speed: --methods and --seeds belong to the pipeline suite; "
                "set the speed suite's fields with --set KEY=VALUE (cvdd.speed.SpeedConfig)"
            )
        settings = dict(parse_override(s) for s in args.set)
        for key, value in (("data", args.data), ("experts", args.experts), ("ipcs", args.ipc), ("seed", args.seed)):
            if value is not None:
                settings.setdefault(key, value)
        settings.setdefault("preset", args.preset)
        out = Path(args.out) if args.out.endswith(".md") else Path(args.out) / "speed.md"
        report = run_speed_suite(
            speed_config(settings, args.budget), device=args.device, out=out, command="cvdd " + shlex.join(args._argv)
        )
        print(f"tables written to {report.path}")
        return 0
    if args.data is None:
        from cvdd.errors import ConfigError

        raise ConfigError("bench --suite pipeline needs --data PATH (CIFAR-10 as an ImageFolder folder or tarball)")
    stages = stage_overrides(args.set)
    preset = get_distill_preset(args.preset)
    ipcs, seeds = args.ipc, args.seeds
    if args.budget == "small":
        ipcs = ipcs or preset.ipcs[:1]
        seeds = seeds or preset.evaluate.seeds[:1]
        # The small budget's overrides first, the command line's --set on top of them.
        small = preset.small_overrides()
        stages = {k: {**small[k], **stages[k]} for k in stages}
    squeeze_over, recover_over, over = stages["squeeze"], stages["recover"], stages["evaluate"]
    t0 = time.perf_counter()
    rows = distill(
        args.data,
        args.out,
        preset=args.preset,
        methods=args.methods,
        ipcs=ipcs,
        seeds=seeds,
        overrides=over,
        recover_overrides=recover_over,
        squeeze_overrides=squeeze_over,
        experts=args.experts,
        seed=args.seed,
        device=args.device,
        progress=progress,
    )
    wall = time.perf_counter() - t0
    from cvdd.device import resolve_device

    dev = resolve_device(args.device)  # the device the run used ("auto", "cuda:1" and CVDD_DEVICE included)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    stage_s = {
        k: max(r["seconds"][k] for r in rows) if k == "squeeze" else sum(r["seconds"][k] for r in rows)
        for k in ("squeeze", "recover", "relabel", "evaluate")
    }
    lines = [
        f"# cvdd bench: {args.preset} ({args.budget} budget)",
        "",
        "Command: `cvdd " + " ".join(shlex.quote(a) for a in args._argv) + "`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, GPU {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), cvdd {__version__}.",
        "",
        f"Wall time {wall:.0f} s; per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_s.items()) + ".",
        "",
        *(
            [
                f"{'Small budget and --set' if args.budget == 'small' else 'Overrides (--set)'}: squeeze "
                f"{squeeze_over or '-'}, recover {recover_over or '-'}, evaluate {over or '-'}.",
                "",
            ]
            if args.budget == "small" or any(stages.values())
            else []
        ),
        (Path(args.out) / "results.md").read_text(),
    ]
    (Path(args.out) / "bench.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from cvdd.api import info

    for key, value in info(args.artifact).items():
        print(f"{key:<17} {value}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cvdd.api import models

    rows = models(num_classes=args.num_classes, image_size=args.image_size)
    print(f"{'name':<16} {'family':<11} {'size':>5} {'params':>11} {'MFLOPs':>10}  description")
    for r in rows:
        print(
            f"{r['name']:<16} {r['family']:<11} {r['image_size']:>5} {r['params']:>11,} {r['mflops']:>10.1f}  "
            f"{r['description']}"
        )
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from cvdd.config import recover_presets, squeeze_presets
    from cvdd.pipeline import distill_presets

    # One line per preset (name, the settings that tell presets apart, description), columns sized to their
    # content, so the list stays readable and greppable.
    wanted = getattr(args, "filter", None) or ""
    squeeze = [
        [n, f"{p.recipe.epochs} ep, {p.recipe.optimizer} lr {p.recipe.lr:g}", ", ".join(p.archs), p.description]
        for n, p in squeeze_presets().items()
        if wanted in n
    ]
    recover = [
        [n, str(c.ipc), f"{c.committee} {'+'.join(c.fixed)}".strip(), f"{c.iterations} it, {c.init}", desc]
        for n, (desc, c) in recover_presets().items()
        if wanted in n
    ]
    distill = [
        [n, ",".join(map(str, d.ipcs)), f"{d.squeeze_preset} / {d.recover_preset}", d.evaluate.student, d.description]
        for n, d in distill_presets().items()
        if wanted in n
    ]
    tables = [
        (["squeeze preset", "recipe", "experts", "description"], squeeze),
        (["recover preset", "ipc", "committee", "optimisation", "description"], recover),
        (["distill preset", "ipc", "squeeze / recover preset", "student", "description"], distill),
    ]
    tables = [t for t in tables if t[1]]
    if not tables:
        print(f"no preset name contains {wanted!r}")
        return 0
    for i, (header, body) in enumerate(tables):
        widths = [max(len(r[k]) for r in [header, *body]) for k in range(len(header) - 1)]
        print("\n" * (i > 0) + "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1])
        for r in body:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


_HANDLERS = {
    "squeeze": _cmd_squeeze,
    "recover": _cmd_recover,
    "relabel": _cmd_relabel,
    "evaluate": _cmd_evaluate,
    "distill": _cmd_distill,
    "prior": _cmd_prior,
    "bench": _cmd_bench,
    "merge": lambda args, progress: _cmd_merge(args),
    "ablate": _cmd_ablate,
    "report": lambda args, progress: _cmd_report(args),
    "export": lambda args, progress: _cmd_export(args),
    "info": lambda args, progress: _cmd_info(args),
    "models": lambda args, progress: _cmd_models(args),
    "presets": lambda args, progress: _cmd_presets(args),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cvdd`` console script; returns the exit status."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args._argv = raw
    if args.command is None:
        parser.print_help()
        return 0
    progress = _setup_logging(args)
    from cvdd import distributed as dd

    track_before = os.environ.get("CVDD_TRACK")
    try:
        # Under torchrun (WORLD_SIZE > 1) every rank joins the group; the stages shard or all-reduce.
        if getattr(args, "track", None):
            os.environ["CVDD_TRACK"] = args.track
        if os.environ.get("CVDD_TRACK"):
            from cvdd import tracking

            tracking.check()  # a bad tracker name or a missing package fails now, not after the first epoch
        if dd.init_from_env(getattr(args, "device", None)) and not dd.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - one report per job: rank 0 prints it
            progress = False
        handler = _HANDLERS.get(args.command)
        if handler is not None:
            status = handler(args, progress)
            dd.shutdown()
            return status
    except CvddError as exc:
        print(f"cvdd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied...: finished files were written atomically and stay
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(
            f"cvdd: error: cannot read or write{where}: {exc.strerror or exc}; finished work is kept", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("cvdd: interrupted; finished work is kept and the next run resumes", file=sys.stderr)
        return 130
    finally:  # --track is this command's: an in-process caller (a notebook, the tests) keeps its environment
        if getattr(args, "track", None):
            if track_before is None:
                os.environ.pop("CVDD_TRACK", None)
            else:
                os.environ["CVDD_TRACK"] = track_before
    parser.error(f"unknown command {args.command}")
    return 2
