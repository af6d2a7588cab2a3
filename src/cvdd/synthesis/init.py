"""Initialisation of synthetic images: RDED-style real patches, random real images, or Gaussian noise.

Every initial image depends only on (run seed, class, IPC index), never on how the work is split into
units, so a resumed or sharded recover starts each image from the same pixels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cvdd.data.augment import Normalize, crop_resize, random_resized_crop_boxes
from cvdd.data.sources import FileSplit, RealDataset, TensorSplit, decode_image
from cvdd.device import derive_seed, make_generator
from cvdd.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INIT_METHODS = ("patches", "real", "gaussian")


def class_indices(data: RealDataset, cls: int) -> torch.Tensor:
    """Indices of the training images of class ``cls`` (int64, ascending)."""
    return torch.nonzero(data.train.labels.cpu() == cls).flatten()


def class_images(data: RealDataset, indices: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, S, S) training images at ``indices`` (decoded from files for streamed datasets)."""
    train = data.train
    if isinstance(train, TensorSplit):
        return train.images[indices.to(train.images.device)].cpu()
    assert isinstance(train, FileSplit)
    size = data.spec.image_size
    out = []
    for i in indices.tolist():
        with open(train.files[i], "rb") as f:
            out.append(decode_image(f.read(), size, train.files[i]))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _pick(data: RealDataset, cls: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct random training indices of class ``cls``, seeded by (seed, class)."""
    idx = class_indices(data, cls)
    if len(idx) < count:
        raise DataError(
            f"class {data.spec.classes[cls]!r} has {len(idx)} training images, fewer than the {count} needed"
        )
    gen = torch.Generator().manual_seed(derive_seed(seed, "init-pick", cls))
    return idx[torch.randperm(len(idx), generator=gen)[:count]]


def real_init(data: RealDataset, cls: int, ipc: int, seed: int) -> torch.Tensor:
    """IPC random real images of one class: uint8 (ipc, 3, S, S); IPC index k is the k-th of a seeded draw."""
    return class_images(data, _pick(data, cls, ipc, seed))


@torch.no_grad()
def patch_init(
    data: RealDataset,
    cls: int,
    ipc: int,
    observer: nn.Module,
    seed: int,
    *,
    candidates: int = 300,
    crops: int = 5,
    factor: int = 1,
    rank_offset: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """RDED-style patch initialisation of one class.

    1. Draw ``candidates`` random real training images of the class (seeded).
    2. From each, take ``crops`` random-resized crops (aspect ratio 1, scale (0.08, 1)) of side S / factor.
    3. Score every crop with the observer expert (eval mode): cross-entropy of the true class, the crop
       zero-padded (centred) back to S x S when factor > 1. Keep each image's lowest-loss crop. Crops are
       normalised with the dataset's mean/std, the statistics the observer was trained with (the official code
       uses ImageNet's for every dataset, with ImageNet-pretrained observers).
    4. Sort the survivors by loss and keep the window ``[rank_offset, rank_offset + ipc * factor**2)``.
    5. Stitch factor x factor crops per image (cell k of image j holds selected crop k * ipc + j).

    Args:
        data: the real dataset.
        cls: class index.
        ipc: images per class to produce.
        observer: the scoring expert (frozen, eval mode).
        seed: run seed.
        candidates: real images considered (capped at the class size).
        crops: crops per real image.
        factor: patches per side (1 for 32/64 px, 2 for 224 px in the method).
        rank_offset: first rank of the kept window (0 = the lowest-loss, most typical crops).
        device: where to score.
        batch_size: scoring batch size.

    Returns:
        uint8 (ipc, 3, S, S) initial images.
    """
    size = data.spec.image_size
    need = ipc * factor * factor
    pool = min(candidates, len(class_indices(data, cls)))
    if pool < need + rank_offset:
        raise DataError(
            f"patch init of class {data.spec.classes[cls]!r} needs {need + rank_offset} candidate images "
            f"(ipc {ipc} x factor {factor}^2 + rank offset {rank_offset}) but has {pool}"
        )
    images = class_images(data, _pick(data, cls, pool, seed)).to(device)
    # Boxes drawn on the CPU (a CUDA generator gives another stream): the same crops on every device, so a run
    # resumed or sharded across CPU and GPU machines starts each class from the same patches.
    gen = make_generator(derive_seed(seed, "init-crops", cls), torch.device("cpu"))
    cell = size // factor
    normalize = Normalize(data.spec)
    boxes = random_resized_crop_boxes(pool * crops, gen, torch.device("cpu"), scale=(0.08, 1.0), ratio=(1.0, 1.0))
    boxes = boxes.to(device).view(pool, crops, 4)
    pad = (size - cell) // 2
    # Crops are cut and scored a chunk of real images at a time, keeping only each image's best crop: the float
    # copies of every crop of every candidate at once were 0.9 GB per class at 224 px (300 images x 5 crops).
    per_chunk = max(1, batch_size // crops)
    chosen = torch.empty(pool, 3, cell, cell, device=device)  # each image's lowest-loss crop, pixels in [0, 255]
    best_loss = torch.empty(pool, device=device)
    for start in range(0, pool, per_chunk):
        src = images[start : start + per_chunk].float().repeat_interleave(crops, dim=0)  # (n * crops, 3, S, S)
        n = src.shape[0] // crops
        patches = crop_resize(src, boxes[start : start + n].reshape(-1, 4), cell).round().clamp(0, 255)
        x = normalize(patches / 255)  # Normalize takes floats in [0, 1]
        if cell != size:  # centred zero padding back to the observer's input size (zeros in normalised space)
            x = nn.functional.pad(x, (pad, size - cell - pad, pad, size - cell - pad))
        target = torch.full((x.shape[0],), cls, device=device, dtype=torch.int64)
        losses = nn.functional.cross_entropy(observer(x).float(), target, reduction="none").view(n, crops)
        best = losses.argmin(1)
        best_loss[start : start + n] = losses.gather(1, best.view(-1, 1)).squeeze(1)
        chosen[start : start + n] = patches.view(n, crops, 3, cell, cell)[torch.arange(n, device=device), best]
    order = torch.argsort(best_loss, stable=True)[rank_offset : rank_offset + need]
    selected = chosen[order]  # (need, 3, cell, cell)
    if factor == 1:
        return selected.to(torch.uint8).cpu()
    out = torch.zeros(ipc, 3, size, size, device=device)
    edges = [round(i * size / factor) for i in range(factor + 1)]
    for k in range(factor * factor):
        r, c = divmod(k, factor)
        h, w = edges[r + 1] - edges[r], edges[c + 1] - edges[c]
        block = selected[k * ipc : (k + 1) * ipc]
        block = nn.functional.interpolate(block, size=(h, w), mode="nearest")
        out[:, :, edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = block
    return out.to(torch.uint8).cpu()


class InitCache:
    """Every class's initial images, made once per run and kept on disk, one uint8 ``.npy`` per class.

    Units visit each class once per block of IPC indices (ImageNet-1K at IPC 50: 50 times), while an
    initialisation draws all IPC indices of a class at once (the patch ranking needs them together). Keeping them
    in memory held 7.5 GB of host memory at ImageNet-1K IPC 50 for the whole run; on disk each visit reads only
    its IPC index (memory-mapped, 150 KB at 224 px), and a resumed run reuses the files instead of scoring every
    class's crops again. The folder belongs to one configuration hash (the initial images depend on nothing
    else); recover removes it once the set is assembled.
    """

    def __init__(self, folder: str | os.PathLike[str], make: Callable[[int], torch.Tensor]) -> None:
        """Args:
        folder: where the class files go (created on first use).
        make: class index -> uint8 (ipc, 3, S, S), the class's initial images.
        """
        self.folder = Path(folder)
        self.make = make
        self._memory: dict[int, torch.Tensor] = {}  # classes whose file could not be written

    def get(self, cls: int, k: int) -> torch.Tensor:
        """IPC index ``k`` of class ``cls``: uint8 (3, S, S), made (and written) on the class's first use.

        The first file written wins and every visit reads it, the first included: ranks or shards that make the
        same class at once (on devices whose arithmetic may differ in the last bit) all start from one version.
        A file that cannot be written (a full disk, a read-only folder) does not stop the run: that class stays in
        memory instead, as before this store existed.
        """
        if cls in self._memory:
            return self._memory[cls][k].clone()
        path = self.folder / f"class_{cls:05d}.npy"
        try:
            return self._read(path, k)
        except (OSError, ValueError, IndexError):  # not made yet (or unreadable: made again, the same pixels)
            pass
        images = self.make(cls)
        try:
            self._publish(path, images)
            return self._read(path, k)
        except (OSError, ValueError, IndexError) as exc:
            if not self._memory:
                log.warning("initial images not written to %s (%s): kept in memory instead", self.folder, exc)
            self._memory[cls] = images
            return images[k].clone()

    @staticmethod
    def _read(path: Path, k: int) -> torch.Tensor:
        return torch.from_numpy(np.array(np.load(path, mmap_mode="r")[k]))

    def _publish(self, path: Path, images: torch.Tensor) -> None:
        """Write the class file unless one exists: a complete temporary file, then a hard link to the final name,
        which fails when another writer was first (a rename would replace its file)."""
        from cvdd.artifacts import fsync_file, temp_sibling

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(path)
        try:
            with open(tmp, "wb") as f:
                np.save(f, images.contiguous().numpy())
            fsync_file(tmp)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another rank or shard was first: its file is the class's
            except OSError:  # a filesystem without hard links: a rename (the last writer wins there)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def gaussian_init(n: int, size: int, seed: int, *keys: int | str) -> torch.Tensor:
    """Normal noise in normalised space (SRe2L's original initialisation): float32 (n, 3, size, size)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "init-gauss", *keys))
    return torch.randn(n, 3, size, size, generator=gen)


def check_init_method(method: str) -> None:
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown init method {method!r}; choose one of {', '.join(INIT_METHODS)}")
