"""Batch iteration: whole tensors on the device for small datasets, a DataLoader for large ones.

Both yield ``(images, labels)`` with images as uint8 (B, 3, H, W) on the target device; augmentation and
normalisation then run batched on that device (:mod:`cvdd.data.augment`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cvdd.data.sources import FileSplit, TensorSplit
from cvdd.data.specs import DatasetSpec
from cvdd.device import derive_seed


class TensorBatches:
    """Shuffled mini-batches of a split that lives whole on the device (no per-sample work, no workers)."""

    def __init__(
        self, split: TensorSplit, batch_size: int, device: torch.device, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last and len(split) > batch_size
        self.device = device

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass; the order comes from ``generator`` (on the split's device)."""
        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


class _FileDataset(torch.utils.data.Dataset):
    """Decode one image file into a uint8 (3, S, S) tensor (used only for large, streamed datasets).

    ``random_crop``: a random-resized crop to S (the training recipe's ``rrc_flip``); otherwise a resize and centre
    crop (evaluation, and training recipes whose own crop then runs on the device).
    """

    def __init__(self, split: FileSplit, size: int, random_crop: bool) -> None:
        from torchvision import transforms

        self.files = split.files
        self.labels = split.labels
        if random_crop:
            self.tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.PILToTensor()])
        else:
            self.tf = transforms.Compose(
                [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size), transforms.PILToTensor()]
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        from cvdd.data.sources import to_rgb
        from cvdd.errors import DataError

        try:
            with Image.open(self.files[i]) as img:
                x = self.tf(to_rgb(img))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # as decode_image
            raise DataError(f"corrupt or unreadable image {self.files[i]}: {exc}") from None
        return x, self.labels[i]


class _ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global batches in a seeded order, of which this rank loads only its contiguous slice.

    Every rank draws the same permutation (same seed), so together the ranks cover each global batch exactly
    once, like a DistributedSampler, while each global batch keeps the composition it has in one process.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, index: int, count: int) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.index, self.count = index, count

    def __len__(self) -> int:
        return sharded_steps(self.n, self.batch_size, self.count)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        else:
            order = list(range(self.n))
        for i in range(len(self)):
            batch = order[i * self.batch_size : (i + 1) * self.batch_size]
            # Balanced slices (sizes differ by at most one): never empty, as a DataLoader cannot collate an empty
            # slice; a last batch smaller than the number of ranks is left out by __len__ on every rank alike.
            yield batch[self.index * len(batch) // self.count : (self.index + 1) * len(batch) // self.count]


def sharded_steps(n: int, batch_size: int, count: int) -> int:
    """Steps per epoch of ``n`` images in global batches of ``batch_size`` over ``count`` ranks: a last batch
    with fewer images than ranks is dropped (it would leave some rank an empty slice)."""
    steps = -(-n // batch_size)
    if count > 1 and 0 < n % batch_size < count:
        steps -= 1
    return steps


def global_batch_size(n: int, batch_size: int, step: int) -> int:
    """Images in global batch ``step`` (0-based) of an epoch over ``n`` images: what weights each rank's slice."""
    return min(batch_size, n - step * batch_size)


class StreamBatches:
    """Mini-batches of a large split through a DataLoader with workers and pinned memory.

    Files differ in size on disk, so the workers bring each image to the image size: a RandomResizedCrop when
    ``random_crop`` is set (training with ``rrc_flip``: the flip then runs on the device), else a resize and centre
    crop (evaluation; other training augmentations then run on the device as for in-memory data), and
    normalisation runs on the device. With ``shard`` = (index, count)
    each process decodes only its slice of every global batch (data-parallel training over many ranks).
    """

    def __init__(
        self,
        split: FileSplit,
        spec: DatasetSpec,
        batch_size: int,
        device: torch.device,
        train: bool,
        workers: int = 4,
        shard: tuple[int, int] = (0, 1),
        random_crop: bool = False,
    ) -> None:
        if shard[1] > batch_size:
            from cvdd.errors import ConfigError

            raise ConfigError(f"batch_size {batch_size} is smaller than the {shard[1]} ranks it is shared among")
        self.dataset = _FileDataset(split, spec.image_size, random_crop)
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.workers = workers
        self.shard = shard

    def __len__(self) -> int:
        return sharded_steps(len(self.dataset), self.batch_size, self.shard[1])

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = (
            int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
            if generator is not None
            else 0
        )
        sampler = _ShardedBatchSampler(len(self.dataset), self.batch_size, self.train, seed, *self.shard)
        worker_seed = derive_seed(seed, "rank", self.shard[0]) if self.shard[1] > 1 else seed
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # Workers draw their random-resized crops from this seed: one per rank, or every rank would crop its
            # slice exactly as rank 0 crops its own (one process keeps the plain seed).
            generator=torch.Generator().manual_seed(worker_seed),
            persistent_workers=False,
        )
        from cvdd.errors import DataError

        try:
            for x, y in loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as exc:
            # A worker's error comes back with its traceback in the message ("Caught DataError in DataLoader worker
            # process 0. Original Traceback ..."); keep the one line that names the file.
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise DataError(lines[-1].split("DataError: ", 1)[-1] if lines else str(exc)) from None


def make_batches(
    split: TensorSplit | FileSplit,
    spec: DatasetSpec,
    batch_size: int,
    device: torch.device,
    train: bool,
    workers: int = 4,
    shard: tuple[int, int] = (0, 1),
    random_crop: bool = False,
) -> TensorBatches | StreamBatches:
    """The right batch iterator for a split: in memory on the device, or streamed from files.

    ``shard`` only applies to streamed splits (in-memory batches are whole on every rank; the training loop
    takes its share of each batch). ``random_crop``: streamed files are random-resized-cropped by the workers
    (see :class:`StreamBatches`); in-memory images are already at the image size.
    """
    if isinstance(split, TensorSplit):
        return TensorBatches(split, batch_size, device, shuffle=train)
    return StreamBatches(split, spec, batch_size, device, train, workers, shard, random_crop)
