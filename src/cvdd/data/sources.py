"""Where real data comes from: the embedded digits, torchvision's CIFAR files, ImageFolder folders and tarballs.

Small datasets (images of at most 64 px) are decoded once into a uint8 tensor cache on disk, keyed by the
content of the source, and then handed to training whole (they live on the device). Large ones (224 px)
stream from disk through a DataLoader with workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cvdd.data.specs import CIFAR10_CLASSES, DatasetSpec, canonical_name, make_spec
from cvdd.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# Bump when the cache layout or the decoding changes, so stale caches are not reused (2: 16-bit greyscale
# scaled, not clipped).
CACHE_FORMAT = 2
TEST_SPLIT_NAMES = ("test", "val")


@dataclass
class TensorSplit:
    """One split held as tensors.

    Attributes:
        images: uint8 tensor of shape (N, 3, H, W), values 0..255.
        labels: int64 tensor of shape (N,), values in [0, num_classes).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels.to(device))

    def subset(self, per_class: int, num_classes: int, seed: int = 0) -> TensorSplit:
        """A class-balanced random subset with ``per_class`` images of each class (seeded)."""
        gen = torch.Generator().manual_seed(seed)
        keep = []
        labels = self.labels.cpu()
        for c in range(num_classes):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) < per_class:
                raise DataError(f"class {c} has only {len(idx)} images, fewer than the {per_class} asked for")
            keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
        order = torch.cat(keep)
        return TensorSplit(self.images[order.to(self.images.device)], self.labels[order.to(self.labels.device)])


@dataclass
class FileSplit:
    """One split of a large dataset, streamed from image files.

    Attributes:
        files: image paths, one per sample.
        labels: int64 tensor of shape (N,).
    """

    files: list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class RealDataset:
    """A real dataset ready for training: its spec and both splits.

    Attributes:
        spec: classes, size and normalisation.
        train: the training split (tensors for small datasets, files for large ones).
        test: the test (or validation) split.
        source: where it came from (a name or a path), for metadata.
        fingerprint: hash of the source's content, stored with every artifact made from it.
    """

    spec: DatasetSpec
    train: TensorSplit | FileSplit
    test: TensorSplit | FileSplit
    source: str
    fingerprint: str
    from_cache: bool = field(default=False, compare=False)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FileSplit)


def default_cache_dir() -> Path:
    """``$CVDD_CACHE`` or ``~/.cache/cvdd``."""
    return Path(os.environ.get("CVDD_CACHE") or Path.home() / ".cache" / "cvdd")


# ----------------------------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a PIL image; 16-bit greyscale (modes ``I;16*``, or ``I`` holding values above 255) is
    scaled by 255/65535 instead of clipped at 255 as ``convert("RGB")`` alone would (a PNG ramp came out 99.6%
    white)."""
    if img.mode.startswith("I;16") or (img.mode == "I" and (img.getextrema()[1] or 0) > 255):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """Decode image bytes into a (size, size, 3) uint8 array.

    Grey, palette and RGBA images are converted to RGB; an image of another size is resized (shorter side to
    ``size``, bilinear with antialiasing) and centre-cropped, so odd sizes are handled rather than fatal.

    Raises:
        DataError: the bytes are not a readable image (corrupt or truncated file); names the file.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"corrupt or unreadable image {name}: {_image_error(exc)}") from None
    if rgb.size != (size, size):
        w, h = rgb.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        rgb = rgb.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    return np.asarray(rgb, dtype=np.uint8)


def _is_image(name: str) -> bool:
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------- layouts


@dataclass
class _Listing:
    """Image entries of an ImageFolder source: split -> class -> sorted entry names."""

    splits: dict[str, dict[str, list[str]]]
    test_split: str


def _check_classes(listing: _Listing, where: str, class_order: list[str] | None) -> tuple[str, ...]:
    train = listing.splits["train"]
    test = listing.splits[listing.test_split]
    for split, classes in (("train", train), (listing.test_split, test)):
        if not classes:
            raise DataError(f"{where}/{split} has no class folders with images")
        for cls, files in classes.items():
            if not files:
                raise DataError(f"class folder {where}/{split}/{cls} has no images")
    if set(train) != set(test):
        only_train = sorted(set(train) - set(test))[:5]
        only_test = sorted(set(test) - set(train))[:5]
        raise DataError(
            f"train/ and {listing.test_split}/ of {where} have different classes "
            f"(only in train: {only_train or '-'}; only in {listing.test_split}: {only_test or '-'})"
        )
    if class_order is not None:
        if sorted(class_order) != sorted(train) or len(set(class_order)) != len(class_order):
            raise DataError(f"the given class order does not list exactly the {len(train)} class folders of {where}")
        return tuple(class_order)
    return tuple(sorted(train))


def _labelled(split_dir: Path) -> bool:
    """Class folders, or Tiny-ImageNet's images/ + val_annotations.txt; not an unlabelled images/ folder alone."""
    if (split_dir / "val_annotations.txt").is_file():
        return True
    return any(e.is_dir() and e.name != "images" and not e.name.startswith(".") for e in os.scandir(split_dir))


def _list_directory(root: Path) -> _Listing:
    if not (root / "train").is_dir():
        raise DataError(
            f"{root} has no train/ folder (expected ImageFolder layout: train/<class>/<image> and test/ or val/)"
        )
    present = [s for s in TEST_SPLIT_NAMES if (root / s).is_dir()]
    if not present:
        raise DataError(f"{root} has train/ but neither test/ nor val/")
    # A split that is only a flat images/ folder without labels (Tiny-ImageNet's test/) cannot be scored: take
    # the first labelled one (its val/ with val_annotations.txt).
    test_split = next((s for s in present if _labelled(root / s)), present[0])
    splits: dict[str, dict[str, list[str]]] = {}
    for split in ("train", test_split):
        classes: dict[str, list[str]] = {}
        split_dir = root / split
        ann = split_dir / "val_annotations.txt"
        if ann.is_file() and (split_dir / "images").is_dir():
            # Tiny-ImageNet's val/ is a flat images/ folder with a label file, not an ImageFolder.
            classes = _parse_annotations(ann.read_text(), f"{split}/images/")
        else:
            for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    files = []
                    for dirpath, _, names in os.walk(entry.path):
                        rel = os.path.relpath(dirpath, root)
                        files.extend(f"{rel}/{n}" for n in names if _is_image(n))
                    classes[entry.name] = sorted(files)
        splits[split] = {c: sorted(f) for c, f in classes.items()}
    return _Listing(splits, test_split)


def _parse_annotations(text: str, base: str) -> dict[str, list[str]]:
    """Tiny-ImageNet's ``val_annotations.txt`` (``file<TAB>class<TAB>box...`` lines) as class -> entry names,
    each ``base + file``."""
    classes: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            classes.setdefault(parts[1], []).append(f"{base}{parts[0]}")
    return classes


def _list_tar(members: Iterable[str], read_text: Callable[[str], str] | None = None) -> tuple[_Listing, str]:
    """Find ``[prefix/]train/<class>/<file>`` entries in a tarball's member names.

    As in a folder, a split that is one flat ``images/`` folder is Tiny-ImageNet's: labelled by the
    ``val_annotations.txt`` beside it (read with ``read_text``), or unlabelled (its ``test/``) and then skipped.
    """
    entries: dict[str, dict[str, dict[str, list[str]]]] = {}
    annotations: dict[tuple[str, str], str] = {}
    for name in members:
        parts = name.split("/")
        if parts[-1] == "val_annotations.txt" and len(parts) >= 2 and parts[-2] in TEST_SPLIT_NAMES:
            annotations["/".join(parts[:-2]), parts[-2]] = name
            continue
        if not _is_image(name):
            continue
        for i, part in enumerate(parts[:-2]):
            if part in ("train", *TEST_SPLIT_NAMES):
                prefix = "/".join(parts[:i])
                cls = parts[i + 1]
                entries.setdefault(prefix, {}).setdefault(part, {}).setdefault(cls, []).append(name)
                break
    for prefix, splits in entries.items():
        for split in [s for s in splits if s != "train" and set(splits[s]) == {"images"}]:
            ann = annotations.get((prefix, split))
            if ann is not None and read_text is not None:
                splits[split] = _parse_annotations(read_text(ann), f"{prefix}/{split}/images/".lstrip("/"))
            else:
                del splits[split]
        test_split = next((s for s in TEST_SPLIT_NAMES if s in splits), None)
        if "train" in splits and test_split:
            return _Listing(
                {s: {c: sorted(f) for c, f in splits[s].items()} for s in ("train", test_split)}, test_split
            ), prefix
    raise DataError("tarball has no train/<class>/<image> and test/ or val/ folders (ImageFolder layout)")


# ----------------------------------------------------------------------------------------------- fingerprints


def _hash_file(path: Path, limit: int = 4 << 30) -> str:
    """sha256 of a file's bytes (size and mtime instead for files over ``limit``, to stay cheap)."""
    st = path.stat()
    h = hashlib.sha256()
    if st.st_size > limit:
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_listing(root: Path, listing: _Listing) -> str:
    """Hash of every image's relative path, size and mtime (cheap, changes when any file changes)."""
    h = hashlib.sha256()
    for split in sorted(listing.splits):
        for cls in sorted(listing.splits[split]):
            for rel in listing.splits[split][cls]:
                try:
                    st = os.stat(root / rel)
                except OSError as exc:  # a broken link, or a file removed while listing
                    raise DataError(f"cannot read image {root / rel}: {exc.strerror or _first_line(exc)}") from None
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        # Tiny-ImageNet's val/ names no class in its paths: its labels live in this file, which must key the cache.
        ann = root / split / "val_annotations.txt"
        if ann.is_file():
            h.update(ann.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- cache


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    base = cache_dir / "datasets"
    return base / f"{key}.safetensors", base / f"{key}.json"


def _load_cache(cache_dir: Path, key: str) -> tuple[TensorSplit, TensorSplit, dict] | None:
    from safetensors.torch import load_file

    tensors_path, meta_path = _cache_paths(cache_dir, key)
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        t = load_file(str(tensors_path))
        return (
            TensorSplit(t["train_images"], t["train_labels"]),
            TensorSplit(t["test_images"], t["test_labels"]),
            meta,
        )
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable dataset cache %s (%s)", tensors_path, exc)
        return None


def _save_cache(cache_dir: Path, key: str, train: TensorSplit, test: TensorSplit, meta: dict) -> None:
    from safetensors.torch import save_file

    from cvdd.artifacts import atomic_write_text, fsync_file, temp_sibling

    tensors_path, meta_path = _cache_paths(cache_dir, key)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(tensors_path)
    tensors = {
        "train_images": train.images.contiguous(),
        "train_labels": train.labels.contiguous(),
        "test_images": test.images.contiguous(),
        "test_labels": test.labels.contiguous(),
    }
    try:
        save_file(tensors, str(tmp))
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written cache file left behind (a full disk)
        raise
    os.replace(tmp, tensors_path)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))


def _decode_split(
    classes: tuple[str, ...],
    entries: dict[str, list[str]],
    read: Callable[[str], bytes],
    size: int,
    desc: str,
    progress: bool,
    position: Callable[[str], int] | None = None,
) -> TensorSplit:
    """Decode a split's images, class by class in name order, into one uint8 tensor.

    Args:
        position: where a file lies in its container (a tar member's offset): files are then read in that order
            and placed at their class-order index. A compressed tarball read out of its stored order
            decompresses from its start at every backward jump (quadratic in the archive: 26 s instead of 0.5 s
            for 1,700 shuffled images); in order, it is one pass.

    Returns:
        images (N, 3, size, size) uint8 and labels (N,) int64, classes in ``classes`` order.
    """
    from tqdm import tqdm

    jobs = [(name, label) for label, cls in enumerate(classes) for name in entries[cls]]
    order = sorted(range(len(jobs)), key=lambda i: position(jobs[i][0])) if position else range(len(jobs))
    images = np.empty((len(jobs), size, size, 3), dtype=np.uint8)
    labels = np.array([label for _, label in jobs], dtype=np.int64)
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for i in order:
            name = jobs[i][0]
            images[i] = decode_image(read(name), size, name)
            bar.update()
    return TensorSplit(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels))


def _probe_size(first: bytes) -> int:
    with Image.open(io.BytesIO(first)) as img:
        w, h = img.size
    # Small images keep their size (CIFAR 32, Tiny-ImageNet 64); anything larger is treated as ImageNet-like.
    return max(w, h) if max(w, h) <= 64 else 224


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _image_error(exc: BaseException) -> str:
    """Why PIL could not read an image, in a few words (not the address of an in-memory buffer)."""
    return "not an image format PIL can read" if isinstance(exc, UnidentifiedImageError) else _first_line(exc)


def _probe_folder_size(
    train: dict[str, list[str]],
    classes: tuple[str, ...],
    read: Callable[[str], bytes],
    samples: int = 16,
    position: Callable[[str], int] | None = None,
) -> int:
    """The image size of a folder: the most common probed size of the first image of up to ``samples`` classes.

    One odd-sized image (a stray 50x37 or 20x90 file sorted first) therefore does not set the size of the
    whole dataset; it is resized like any other odd image.
    """
    from collections import Counter

    names = [train[cls][0] for cls in classes[:: max(1, len(classes) // samples)][:samples]]
    probed = {}
    for name in sorted(names, key=position) if position else names:  # stored order: see _decode_split
        try:
            probed[name] = _probe_size(read(name))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"corrupt or unreadable image {name}: {_image_error(exc)}") from None
    sizes = Counter(probed[name] for name in names)  # counted in class order: ties break alike for folder and tar
    return sizes.most_common(1)[0][0]


def _spec_for_folder(
    name_hint: str | None, classes: tuple[str, ...], size: int, source: Path, image_size: int | None
) -> DatasetSpec:
    if name_hint is not None:
        return make_spec(name_hint, classes, image_size=image_size)
    if classes == CIFAR10_CLASSES and size == 32:
        return make_spec("cifar10", classes, image_size=image_size)
    from cvdd.data.specs import IMAGENET_MEAN, IMAGENET_STD

    name = source.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    size = image_size or size
    return DatasetSpec(
        name=name or "folder",
        classes=classes,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        jitter=4 if size <= 64 else 32,
        default_preset="cifar10" if size <= 64 else "imagenette",
    )


# ----------------------------------------------------------------------------------------------- sources


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images (1797, 8, 8) in 0..16, targets (1797,))``.

    Read straight from the CSV file scikit-learn ships (64 pixel values and the class per row), found without
    importing scikit-learn: ``import sklearn.datasets`` costs about 2 s of a 2 GHz core (scipy, pandas), which
    every command on the embedded dataset would pay. Falls back to ``load_digits`` if the file is not there.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        csv = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            rows = np.loadtxt(csv, delimiter=",")
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits() -> tuple[TensorSplit, TensorSplit, tuple[str, ...]]:
    """scikit-learn's bundled 8x8 digits (1797 real scans), resized to 32 px, grey replicated to RGB.

    The split is fixed and stratified: within each class, every fifth image (in the file's order) is a
    test image, so about 1437 train and 360 test images.
    """
    images, target = _digits_arrays()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(target.astype(np.int64))
    is_test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        is_test[idx[::5]] = True
    classes = tuple(str(c) for c in range(10))
    return TensorSplit(x[~is_test], y[~is_test]), TensorSplit(x[is_test], y[is_test]), classes


def _load_torchvision_cifar(name: str, root: Path, download: bool) -> tuple[TensorSplit, TensorSplit, tuple]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"{name} files not found under {root} ({str(exc).splitlines()[0]}); pass --download to fetch them, "
            f"or --data PATH to an ImageFolder folder or tarball"
        ) from None

    def split(ds: object) -> TensorSplit:
        data = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # type: ignore[attr-defined]
        return TensorSplit(data, torch.tensor(ds.targets, dtype=torch.int64))  # type: ignore[attr-defined]

    return split(train), split(test), tuple(train.classes)


def load_dataset(
    dataset: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    image_size: int | None = None,
    class_order: list[str] | None = None,
    progress: bool = True,
) -> RealDataset:
    """Load a real dataset by name or path.

    Args:
        dataset: ``digits`` (embedded), ``cifar10``, ``cifar100``, another known name used with ``data``,
            or a path to an ImageFolder directory or ``.tar``/``.tar.gz`` with ``train/`` and ``test/`` or
            ``val/``.
        data: where a named dataset lives (a folder or tarball in ImageFolder layout, or torchvision's CIFAR
            root). For cifar10/cifar100 without it, torchvision's files under the cache directory.
        cache_dir: where decoded uint8 caches (and torchvision downloads) go; default :func:`default_cache_dir`.
        download: allow torchvision to download CIFAR files (never done unless asked).
        image_size: override the image size (images are resized and centre-cropped to it).
        class_order: explicit class-folder names in label order (default: sorted folder names).
        progress: show a progress bar while decoding.

    Returns:
        The dataset with uint8 tensors (small) or file lists (large, > 64 px).

    Raises:
        DataError: missing path, wrong layout, empty class, corrupt image, train/test class mismatch.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name_hint: str | None = None
    source: Path | None = None
    ds_str = os.fspath(dataset)
    if canonical_name(ds_str) is not None and not os.path.exists(ds_str):
        name_hint = canonical_name(ds_str)
        if data is not None:
            source = Path(data)
    else:
        source = Path(ds_str)
        if data is not None:
            raise DataError("give the dataset either as a path or as a name with --data, not both")
        if not source.exists():
            raise missing_dataset_error(ds_str)

    if name_hint == "digits":
        train, test, classes = _load_digits()
        spec = make_spec("digits", classes, image_size=None)
        mean = tuple(float(v) for v in (train.images.float() / 255).mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in (train.images.float() / 255).std(dim=(0, 2, 3)))
        spec = DatasetSpec(
            spec.name,
            spec.classes,
            spec.image_size,
            mean,
            std,
            spec.jitter,  # type: ignore[arg-type]
            spec.default_preset,
        )
        if image_size:
            spec = DatasetSpec(
                spec.name, spec.classes, image_size, spec.mean, spec.std, spec.jitter, spec.default_preset
            )
            train, test = _resize(train, image_size), _resize(test, image_size)
        fp = hashlib.sha256(train.images.numpy().tobytes()).hexdigest()[:16]
        return RealDataset(spec, train, test, "digits", fp)

    if name_hint in ("cifar10", "cifar100") and (
        source is None or (source.is_dir() and not (source / "train").is_dir())
    ):
        root = source if source is not None else cache / "torchvision"
        train, test, classes = _load_torchvision_cifar(name_hint, root, download)
        spec = make_spec(name_hint, classes)
        if image_size and image_size != spec.image_size:
            spec = make_spec(name_hint, classes, image_size=image_size)
            train, test = _resize(train, image_size), _resize(test, image_size)
        fp = hashlib.sha256(f"torchvision:{name_hint}:{len(train)}:{len(test)}".encode()).hexdigest()[:16]
        return RealDataset(spec, train, test, f"torchvision:{name_hint}", fp)

    if source is None:
        raise DataError(
            f"dataset '{name_hint}' needs --data PATH (an ImageFolder folder or tarball with train/ and val/)"
        )
    if not source.exists():
        raise DataError(f"dataset path does not exist: {source}")
    return _load_imagefolder(source, name_hint, cache, image_size, class_order, progress)


def missing_dataset_error(dataset: str) -> DataError:
    """The error for a ``--dataset`` that is neither a known name nor an existing path."""
    known = ", ".join(sorted({"digits", "cifar10", "cifar100"}))
    if os.sep in dataset or "." in os.path.basename(dataset):  # looks like a path
        return DataError(f"dataset path does not exist: {dataset}")
    return DataError(f"unknown dataset '{dataset}' (not a known name like {known}, nor an existing path)")


def _resize(split: TensorSplit, size: int) -> TensorSplit:
    x = torch.nn.functional.interpolate(
        split.images.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return TensorSplit(x.round().clamp(0, 255).to(torch.uint8), split.labels)


def _load_imagefolder(
    source: Path,
    name_hint: str | None,
    cache: Path,
    image_size: int | None,
    class_order: list[str] | None,
    progress: bool,
) -> RealDataset:
    is_tar = source.is_file()
    position: Callable[[str], int] | None = None  # a folder's files are read in class order
    prefix = ""  # the top folders of a tarball's members above train/
    if is_tar:
        try:
            tar = tarfile.open(source, "r:*")  # noqa: SIM115 (closed in the finally below)
        except (tarfile.TarError, OSError) as exc:
            reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
            raise DataError(f"cannot open {source} as a tarball (.tar, .tar.gz, .tar.bz2, .tar.xz): {reason}") from None
        try:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            tar.close()
            raise DataError(f"truncated or corrupt tarball {source}: {_first_line(exc)}") from None

        def read(name: str) -> bytes:
            if name not in members:  # named by an annotation file, absent from the archive
                raise DataError(f"cannot read {name} from tarball {source}: no such member")
            try:
                f = tar.extractfile(members[name])
                assert f is not None
                return f.read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise DataError(f"cannot read {name} from tarball {source}: {_first_line(exc)}") from None

        listing, prefix = _list_tar(members, lambda name: read(name).decode("utf-8", "replace"))

        fingerprint = _hash_file(source)

        def offset(name: str) -> int:
            return members[name].offset if name in members else -1  # a missing one: read() names it

        position = offset

    else:
        if not source.is_dir():
            raise DataError(f"dataset path is neither a folder nor a tarball: {source}")
        tar = None
        listing = _list_directory(source)

        def read(name: str) -> bytes:
            try:
                return (source / name).read_bytes()
            except OSError as exc:  # removed meanwhile, no permission, an I/O error of the disk
                raise DataError(f"cannot read image {source / name}: {exc.strerror or _first_line(exc)}") from None

        fingerprint = _hash_listing(source, listing)
    try:
        classes = _check_classes(listing, str(source), class_order)
        probed = _probe_folder_size(listing.splits["train"], classes, read, position=position)
        spec = _spec_for_folder(name_hint, classes, probed, source, image_size)
        fingerprint = hashlib.sha256(f"{fingerprint}:{classes}".encode()).hexdigest()[:16]

        def cache_key(version: int) -> str:
            return hashlib.sha256(
                f"v{version}:{fingerprint}:{spec.image_size}:{','.join(classes)}".encode()
            ).hexdigest()[:24]

        if spec.large:
            # A large tarball is extracted, not decoded: its folder keeps the key of format 1, so a change of the
            # decoding does not extract ImageNet again.
            return _streamed(source, tar, prefix, listing, classes, spec, cache, cache_key(1), fingerprint)
        key = cache_key(CACHE_FORMAT)

        cached = _load_cache(cache, key)
        if cached is not None:
            train, test, _ = cached
            log.info("using decoded cache of %s (%d train, %d test images)", source, len(train), len(test))
            return RealDataset(spec, train, test, str(source), fingerprint, from_cache=True)
        train = _decode_split(
            classes, listing.splits["train"], read, spec.image_size, "decode train", progress, position
        )
        test = _decode_split(
            classes,
            listing.splits[listing.test_split],
            read,
            spec.image_size,
            f"decode {listing.test_split}",
            progress,
            position,
        )
        try:
            meta = {"source": str(source), "classes": list(classes), "image_size": spec.image_size}
            _save_cache(cache, key, train, test, {**meta, "format": CACHE_FORMAT})
        except Exception as exc:  # the images are decoded: a read-only or full cache costs only their reuse
            log.warning("could not write the dataset cache in %s (%s): decoding again next time", cache, exc)
        return RealDataset(spec, train, test, str(source), fingerprint)
    finally:
        if tar is not None:
            tar.close()


def _remove_dead_extractions(root: Path, min_age_s: float = 86400.0) -> None:
    """Delete this host's unfinished extractions of ``root`` left by killed runs (each can be a whole copy of the
    dataset): named with this host and a process id that no longer runs, and untouched for ``min_age_s``.

    The age guards against processes that share the host name but not the process ids (containers with host
    networking); extractions of other hosts, and of live processes, are left alone. Older cvdd named them
    ``<key>.tmp<pid>``.
    """
    host = socket.gethostname()
    for tmp in root.parent.glob(f"{root.name}.tmp*") if root.parent.is_dir() else []:
        suffix = tmp.name[len(root.name) + len(".tmp") :]
        pid = suffix[len(f"-{host}-") :] if suffix.startswith(f"-{host}-") else suffix
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if time.time() - tmp.stat().st_mtime < min_age_s:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing an unfinished extraction of a killed run: %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive (another user's), or gone meanwhile
            pass


@contextlib.contextmanager
def _host_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) for the block; a no-op where ``fcntl`` is
    missing (Windows), where the rename in the caller still keeps the result whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")  # noqa: SIM115 - closed below
    except OSError:  # a read-only cache: the extraction itself reports what fails
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some NFS or Lustre mounts): unlocked, as before
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _streamed(
    source: Path,
    tar: tarfile.TarFile | None,
    prefix: str,
    listing: _Listing,
    classes: tuple[str, ...],
    spec: DatasetSpec,
    cache: Path,
    key: str,
    fingerprint: str,
) -> RealDataset:
    """A large dataset: file lists (a tarball is extracted once into the cache, since random access into a
    compressed tar from DataLoader workers would be slow)."""
    root = source
    if tar is not None:
        root = cache / "extracted" / key
        done = root / ".complete"
        if not done.exists():
            _remove_dead_extractions(root)
            # root only ever appears whole (renamed from a finished extraction): present means complete. The lock
            # makes the other processes of this host (torchrun ranks) wait for one extraction instead of each
            # writing a whole copy of the dataset.
            with _host_lock(cache / "locks" / f"extract-{key}.lock"):
                if not root.exists():
                    log.info("extracting %s to %s (once)", source, root)
                    tmp = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{os.getpid()}")
                    try:
                        tar.extractall(tmp, filter="data")
                    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise DataError(f"cannot extract {source} into {root.parent}: {_first_line(exc)}") from None
                    try:
                        os.replace(tmp, root)
                    except OSError:  # another host sharing the cache finished first: keep its copy, drop ours
                        shutil.rmtree(tmp, ignore_errors=True)
            done.touch()
        root = root / prefix if prefix else root

    def split(name: str) -> FileSplit:
        files, labels = [], []
        for label, cls in enumerate(classes):
            for rel in listing.splits[name][cls]:
                rel = rel[len(_strip_prefix(rel, name)) :] if tar is not None else rel
                files.append(str(root / rel))
                labels.append(label)
        return FileSplit(files, torch.tensor(labels, dtype=torch.int64))

    return RealDataset(spec, split("train"), split(listing.test_split), str(source), fingerprint)


def _strip_prefix(rel: str, split: str) -> str:
    """The part of a tar member name before its ``<split>/`` folder (the tarball's top folders, if any).

    The split must be a whole path component: ``pretrain/train/c/x.jpg`` has the prefix ``pretrain/``.
    """
    if rel.startswith(f"{split}/"):
        return ""
    i = rel.find(f"/{split}/")
    return rel[: i + 1] if i >= 0 else ""
