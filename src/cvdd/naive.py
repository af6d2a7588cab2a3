"""A DELIBERATELY NAIVE reference pipeline, for ``cvdd bench --suite speed`` only. Do not use it for anything else.

It is written the way research code of this field usually is, so that the speed suite can show, on the same
machine, data and models, what cvdd's data handling buys. Every choice below is the slow but common one, on
purpose:

* images are files in an ImageFolder (PNG for synthetic sets, the dataset's JPEGs for real ones), read by
  torchvision's ``ImageFolder`` through a ``DataLoader`` and decoded with PIL on every access, every epoch;
* torchvision transforms (``RandomResizedCrop``/``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize``) are rebuilt inside the loop, per image or per iteration;
* CutMix is done in NumPy, per batch, on host copies of the batch;
* soft labels are one ``torch.save`` file per batch (the official relabel code wrote about 940,000 of them for
  ImageNet-1K), holding the batch's image indices, crop boxes, flips, CutMix permutation and box, and logits,
  and are ``torch.load``-ed back one file per batch while the student trains;
* the BSSL teacher is simply left in ``train()`` mode (its BatchNorm layers use, and drift, batch statistics);
* recover reloads every expert of the committee from disk for every IPC index, optimises one IPC index (one
  image per class) at a time, computes BN statistics with separate mean and variance reductions, and saves every
  image as its own PNG file.

The arithmetic is kept the same as cvdd's stages wherever the comparison needs it: the same models, batch sizes,
micro-batches (gradient accumulation over the teacher's BN groups), epochs, iterations, loss functions, and
(on CUDA) the same autocast precision; so the ratio compares pipelines, not workloads. "Pipeline" includes how the
models run: cvdd trains and labels in channels_last (faster on both CPU and GPU), the naive code in PyTorch's
default layout, so part of a ratio comes from inside the models (the tables print each side's model share).
Written for this project from the method's description; no code was copied from other repositories.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import functional as TF

__all__ = [
    "naive_evaluate",
    "naive_recover",
    "naive_relabel",
    "naive_squeeze_epoch",
    "write_png_folder",
]


def _autocast(device: torch.device, precision: str) -> Any:
    import contextlib

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_png_folder(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], root: str | Path) -> int:
    """Write a set as an ImageFolder of PNG files, ``root/<class>/<k>.png`` (k counts within the class).

    Args:
        images: uint8 (N, 3, S, S).
        labels: int64 (N,).
        classes: class names (folder names), indexed by label.
        root: destination folder (created).

    Returns:
        Number of files written.
    """
    from PIL import Image

    root = Path(root)
    counts: dict[int, int] = {}
    for img, lab in zip(images, labels.tolist()):
        k = counts.get(lab, 0)
        counts[lab] = k + 1
        folder = root / classes[lab]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(folder / f"{k:05d}.png")
    return len(labels)


# --------------------------------------------------------------------------------------------------------------
# Squeeze: one epoch of an ImageFolder + DataLoader + PIL pipeline
# --------------------------------------------------------------------------------------------------------------


def naive_squeeze_epoch(
    train_root: str | Path,
    model: nn.Module,
    recipe: Any,
    mean: Sequence[float],
    std: Sequence[float],
    size: int,
    device: torch.device,
    *,
    workers: int = 0,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, Any]:
    """One training epoch of ``model`` on the real images of ``train_root``, the common way.

    ``ImageFolder`` with ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``
    (decoded with PIL per image), a shuffling ``DataLoader``, SGD/Adam from the recipe, cross-entropy with the
    recipe's label smoothing.

    Returns:
        ``images`` trained on, ``steps``, ``seconds`` (the epoch, loader start-up included).
    """
    torch.manual_seed(seed)
    tf = transforms.Compose(
        [
            transforms.RandomCrop(size, padding=recipe.padding),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    ds = datasets.ImageFolder(str(train_root), transform=tf)
    loader = DataLoader(ds, batch_size=recipe.batch_size, shuffle=True, num_workers=workers)
    model.to(device).train()
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    images = steps = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device, precision):
            out = model(x)
        loss = criterion(out.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        images += len(y)
        steps += 1
    _sync(device)
    return {"images": images, "steps": steps, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------------------
# Relabel and evaluate: per-batch label files, PIL decoding with per-image transforms, NumPy CutMix
# --------------------------------------------------------------------------------------------------------------


class _ReplayFolder(datasets.ImageFolder):
    """An ImageFolder addressed by ``(index, (top, left, height, width), flip)``.

    Every access opens the file with PIL and builds a transform pipeline for that access (crop box and flip
    fixed by the key), as the official relabel/train code did with its coordinate-replaying transforms.
    """

    def __init__(self, root: str | Path, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(str(root))
        self.size, self.mean, self.std = size, list(mean), list(std)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, (top, left, height, width), flip = key
        path, target = self.samples[index]
        img = self.loader(path)
        size = self.size
        pipeline = transforms.Compose(
            [
                transforms.Lambda(lambda im: TF.resized_crop(im, top, left, height, width, [size, size])),
                transforms.RandomHorizontalFlip(p=1.0 if flip else 0.0),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )
        return pipeline(img), target


class _DrawnBatches(Sampler):
    """Relabel's batch sampler: draws each epoch's order, crop boxes and flips with torch's global RNG."""

    def __init__(self, n: int, batch_size: int, size: int, scale: tuple[float, float], seed: int) -> None:
        self.n, self.batch_size, self.size, self.scale, self.seed = n, batch_size, size, scale, seed
        self.keys: list[list[tuple[int, tuple[int, int, int, int], bool]]] = []

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int, int, int], bool]]]:
        torch.manual_seed(self.seed)
        dummy = torch.empty(3, self.size, self.size)
        order = torch.randperm(self.n).tolist()
        for b in range(len(self)):
            keys = []
            for i in order[b * self.batch_size : (b + 1) * self.batch_size]:
                box = transforms.RandomResizedCrop.get_params(dummy, list(self.scale), [3 / 4, 4 / 3])
                keys.append((i, tuple(int(v) for v in box), bool(torch.rand(1).item() < 0.5)))
            self.keys.append(keys)
            yield keys


class _StoredBatches(Sampler):
    """Training's batch sampler: ``torch.load``-s each batch file of the epoch and yields its keys.

    The loaded payloads (logits, CutMix permutation and box) wait in ``payloads`` for the training loop, in
    batch order (the DataLoader's batch sampler runs in the main process, also with workers).
    """

    def __init__(self, epoch_dir: Path) -> None:
        self.files = sorted(epoch_dir.glob("batch_*.pt"))
        self.payloads: deque[dict[str, Any]] = deque()

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int, int, int], bool]]]:
        for f in self.files:
            payload = torch.load(f, weights_only=False)
            self.payloads.append(payload)
            yield payload["keys"]


def _numpy_cutmix(x: torch.Tensor, perm: np.ndarray, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Paste ``box`` of each image's partner ``perm[i]`` into it, in NumPy on a host copy of the batch."""
    arr = x.numpy().copy()
    y0, x0, y1, x1 = box
    if (y1 - y0) * (x1 - x0) > 0:
        arr[:, :, y0:y1, x0:x1] = arr[perm][:, :, y0:y1, x0:x1]
    return torch.from_numpy(arr)


def _draw_cutmix(n: int, size: int, rng: np.random.RandomState) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """λ ~ Beta(1, 1), a square of side ⌊S·√(1−λ)⌋ around a uniform centre, clipped; a random permutation."""
    lam = rng.beta(1.0, 1.0)
    cut = int(size * math.sqrt(1.0 - lam))
    cy, cx = rng.randint(size), rng.randint(size)
    y0, y1 = int(np.clip(cy - cut // 2, 0, size)), int(np.clip(cy + cut // 2, 0, size))
    x0, x1 = int(np.clip(cx - cut // 2, 0, size)), int(np.clip(cx + cut // 2, 0, size))
    return rng.permutation(n), (y0, x0, y1, x1)


def naive_relabel(
    png_root: str | Path,
    expert_files: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path,
    *,
    epochs: int,
    batch_size: int,
    micro_batch: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    device: torch.device,
    seed: int = 0,
    workers: int = 0,
    timer: Any = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Soft labels the naive way: one teacher pass per batch of PIL-decoded files, one ``torch.save`` per batch.

    Files: ``out/epoch_<e>/batch_<b>.pt`` with the batch's keys (image index, crop box, flip), CutMix permutation
    and box, and fp16 logits of the committee (Σ w_k z_k, each expert in ``train()`` mode on groups of
    ``micro_batch`` images: the student's BN groups).

    Returns:
        ``files`` written, their ``bytes``, ``seconds`` (experts loaded inside), ``epochs``.
    """
    from cvdd.experts import load_expert

    t0 = time.perf_counter()
    teachers = []
    for f in expert_files:
        model = load_expert(f, device=device).model
        model.train()  # BN on batch statistics, the usual way (running statistics drift; dropout would be on)
        teachers.append(timer.add(model) if timer is not None else model)
    ds = _ReplayFolder(png_root, size, mean, std)
    out = Path(out)
    files = nbytes = 0
    for epoch in range(epochs):
        epoch_dir = out / f"epoch_{epoch}"
        epoch_dir.mkdir(parents=True, exist_ok=True)
        sampler = _DrawnBatches(len(ds), batch_size, size, crop_scale, seed * 100003 + epoch)
        rng = np.random.RandomState((seed * 100003 + epoch) % 2**32)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        for b, (x, _) in enumerate(loader):
            perm, box = _draw_cutmix(len(x), size, rng)
            x = _numpy_cutmix(x, perm, box).to(device)
            logits = []
            with torch.no_grad(), _autocast(device, precision):
                for group in x.split(micro_batch) if micro_batch > 0 else [x]:
                    z = sum(w * t(group).float() for t, w in zip(teachers, weights))
                    logits.append(z)
            path = epoch_dir / f"batch_{b}.pt"
            torch.save(
                {"keys": sampler.keys[b], "perm": perm, "box": box, "logits": torch.cat(logits).half().cpu()}, path
            )
            files += 1
            nbytes += os.path.getsize(path)
    _sync(device)
    return {"files": files, "bytes": nbytes, "seconds": time.perf_counter() - t0, "epochs": epochs}


def naive_evaluate(
    png_root: str | Path,
    label_dir: str | Path,
    student: nn.Module,
    *,
    epochs: int,
    batch_size: int,
    micro_batch: int,
    lr: float,
    weight_decay: float,
    temperature: float,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    workers: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train ``student`` on a PNG ImageFolder with per-batch soft-label files, the common way.

    Per epoch: a ``DataLoader`` over the ImageFolder whose batch sampler ``torch.load``-s each batch file of the
    epoch; every image is decoded with PIL and transformed by a pipeline rebuilt for it; CutMix in NumPy;
    KL(softmax(z_t / T) || softmax(z_s / T)) (batchmean) over micro-batches of ``micro_batch`` images with
    gradient accumulation, one AdamW step per batch; a cosine learning rate stepped per epoch.

    Returns:
        ``epoch_seconds`` (one per epoch), ``steps`` (optimiser steps), ``micro_batches``, ``images``, ``files``
        read.
    """
    ds = _ReplayFolder(png_root, size, mean, std)
    student.to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    kl = nn.KLDivLoss(reduction="batchmean")
    label_dir = Path(label_dir)
    epoch_seconds: list[float] = []
    steps = micros = images = files = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        sampler = _StoredBatches(label_dir / f"epoch_{epoch}")
        if not len(sampler):
            raise FileNotFoundError(f"no soft-label files in {label_dir / f'epoch_{epoch}'} (run naive_relabel first)")
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        for x, _ in loader:
            payload = sampler.payloads.popleft()
            files += 1
            x = _numpy_cutmix(x, payload["perm"], payload["box"]).to(device)
            soft = payload["logits"].float().to(device)
            opt.zero_grad()
            step = micro_batch if micro_batch > 0 else len(x)
            for i in range(0, len(x), step):
                xs, ts = x[i : i + step], soft[i : i + step]
                with _autocast(device, precision):
                    out = student(xs)
                loss = kl(
                    torch.log_softmax(out.float() / temperature, dim=1), torch.softmax(ts / temperature, dim=1)
                ) * (len(xs) / len(x))
                loss.backward()
                micros += 1
                images += len(xs)
            opt.step()
            steps += 1
        sched.step()
        _sync(device)
        epoch_seconds.append(time.perf_counter() - t0)
    return {"epoch_seconds": epoch_seconds, "steps": steps, "micro_batches": micros, "images": images, "files": files}


# --------------------------------------------------------------------------------------------------------------
# Recover: one IPC index at a time, experts reloaded per IPC index, transforms rebuilt per iteration
# --------------------------------------------------------------------------------------------------------------


class _BNStats:
    """Forward hook on a BatchNorm2d: ‖μ(x) − μ̂‖₂ + ‖σ²(x) − σ̂²‖₂ of its input, two separate reductions."""

    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.handle = module.register_forward_hook(self.hook)
        self.value: torch.Tensor | None = None

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).reshape(c, -1).var(1, unbiased=False)
        self.value = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def remove(self) -> None:
        self.handle.remove()


def naive_recover(
    train_root: str | Path,
    expert_files: dict[str, str | Path],
    committees: Sequence[Sequence[str]],
    weights: Sequence[Sequence[float]],
    out: str | Path,
    *,
    iterations: int,
    lr: float,
    betas: tuple[float, float],
    r_bn: float,
    first_bn_multiplier: float,
    jitter: int,
    crop_scale: tuple[float, float],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """CV-DD recover the way the official scripts run it: one IPC index (one image per class) at a time.

    For IPC index k: reload every expert of ``committees[k]`` from disk, hook its BN layers, initialise one real
    image per class (a random file of the class, decoded with PIL), then per iteration rebuild
    ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` and apply it to the batch, roll-jitter, and minimise
    Σ_e w_e (CE_e + r_bn · BN_e) (first BN layer x ``first_bn_multiplier``) with Adam, a cosine learning rate and
    clamping to the valid pixel range; finally save every image as a PNG file.

    Returns:
        ``images``, ``seconds``, ``forward_s`` (experts' forward + loss), ``backward_s``, ``reloads`` (experts
        loaded), ``load_s`` (loading them), ``init_s`` (initial images), ``optimise_s`` (the iterations),
        ``iterations`` run; forward/backward timed with explicit synchronised timers.
    """
    from PIL import Image

    from cvdd.experts import load_expert

    t_start = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    ds = datasets.ImageFolder(str(train_root))
    num_classes = len(ds.classes)
    by_class: dict[int, list[int]] = {}
    for i, (_, target) in enumerate(ds.samples):
        by_class.setdefault(target, []).append(i)
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    lo, hi = (0 - m) / s, (1 - m) / s
    out = Path(out)
    # The share timers: the wall clock on a CPU; CUDA events on a GPU, read once at the end (a host sync at each
    # boundary would slow this launch-bound loop of ten-image batches more than cvdd's, whose timer has none).
    spans: list[tuple[Any, Any, Any]] = []

    def clock() -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    reloads = its = images = 0
    load_s = init_s = optimise_s = 0.0
    y = torch.arange(num_classes, device=device)
    for k, (members, member_w) in enumerate(zip(committees, weights)):
        t_load = time.perf_counter()
        experts = []
        for name in members:
            model = load_expert(expert_files[name], device=device).model.eval()  # reloaded for every IPC index
            for p in model.parameters():
                p.requires_grad_(False)
            hooks = [_BNStats(mod) for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
            experts.append((model, hooks))
            reloads += 1
        t_init = time.perf_counter()
        load_s += t_init - t_load
        x = torch.stack(
            [to_input(ds.loader(ds.samples[random.choice(by_class[c])][0])) for c in range(num_classes)]
        ).to(device)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr, betas=betas, eps=1e-8)
        _sync(device)
        t_opt = time.perf_counter()
        init_s += t_opt - t_init
        for it in range(iterations):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / iterations))
            augment = transforms.Compose(  # rebuilt every iteration, as the official scripts do
                [
                    transforms.RandomResizedCrop(size, scale=crop_scale, antialias=True),
                    transforms.RandomHorizontalFlip(),
                ]
            )
            xa = augment(x)
            xa = torch.roll(xa, shifts=(random.randint(0, jitter), random.randint(0, jitter)), dims=(2, 3))
            t0 = clock()
            loss = x.new_zeros(())
            for (model, hooks), w in zip(experts, member_w):
                with _autocast(device, precision):
                    logits = model(xa)
                bn = sum((first_bn_multiplier if i == 0 else 1.0) * h.value for i, h in enumerate(hooks))
                loss = loss + w * (nn.functional.cross_entropy(logits.float(), y) + r_bn * bn)
            t1 = clock()
            opt.zero_grad()
            loss.backward()
            t2 = clock()
            spans.append((t0, t1, t2))
            opt.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, hi), lo)
            its += 1
        _sync(device)
        optimise_s += time.perf_counter() - t_opt
        pixels = (x.detach() * s + m).clamp(0, 1)
        for c in range(num_classes):
            folder = out / f"new{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            arr = (pixels[c] * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            Image.fromarray(arr).save(folder / f"class{c:03d}_id{k:03d}.png")
            images += 1
        for _, hooks in experts:
            for h in hooks:
                h.remove()
        del experts
    _sync(device)
    seconds = time.perf_counter() - t_start
    if device.type == "cuda":  # events: completed after the sync above
        fwd = sum(a.elapsed_time(b) for a, b, _ in spans) / 1000
        bwd = sum(b.elapsed_time(c) for _, b, c in spans) / 1000
    else:
        fwd = sum(b - a for a, b, _ in spans)
        bwd = sum(c - b for _, b, c in spans)
    return {
        "images": images,
        "seconds": seconds,
        "forward_s": fwd,
        "backward_s": bwd,
        "reloads": reloads,
        "load_s": load_s,
        "init_s": init_s,
        "optimise_s": optimise_s,
        "iterations": its,
    }
