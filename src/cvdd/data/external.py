"""Synthetic sets made outside ``cvdd recover``: an ImageFolder of images, or a ``cvdd export`` file.

``cvdd evaluate`` and ``cvdd relabel`` accept, besides a recover output:

* a folder of class sub-folders, ``<folder>/<class>/<image>`` (any image format PIL reads), or the Hugging
  Face layout ``<folder>/train/<class>/<image>`` written by ``cvdd export --format hf``. The class folder names
  must be exactly the real dataset's class names; labels follow the dataset's class order, never the folder
  order. Images are read in sorted file-name order within each class, and an image of another size is resized
  and centre-cropped as real images are (with a warning). A ``labels/`` folder holding ``labels.json`` (stored
  soft labels that ``cvdd evaluate`` writes next to its input) is not a class;
* a ``.npz`` or ``.safetensors`` file written by ``cvdd export`` (classes are matched by name).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvdd.data.sources import IMAGE_EXTENSIONS, decode_image
from cvdd.data.specs import DatasetSpec
from cvdd.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["describe_external_set", "is_external_set", "load_external_set", "load_image_folder"]

#: ``kind`` in the header of a safetensors file written by ``cvdd export`` (see cvdd.synthesis.export).
_EXPORT_KIND = "cvdd-export"
#: Entries of a recover output folder (finished or not); a folder holding one is never read as images.
_RECOVER_MARKERS = ("synthetic.safetensors", "recover.json", "units")


def is_external_set(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read by :func:`load_external_set` rather than as a recover output.

    True for a folder that is not a recover output (no ``synthetic.safetensors``, ``recover.json`` or
    ``units/``: an unfinished recover folder still gets recover's "incomplete" error, not a class mismatch),
    a ``.npz`` file, and a ``.safetensors`` file without the ``.json`` sidecar of a recover artifact.
    """
    p = Path(path)
    if p.is_dir():
        return not any((p / name).exists() for name in _RECOVER_MARKERS)
    if p.is_file() and p.suffix == ".npz":
        return True
    return p.is_file() and p.suffix == ".safetensors" and not p.with_suffix(".json").is_file()


def load_external_set(path: str | os.PathLike[str], spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an external synthetic set for the dataset ``spec``.

    Args:
        path: an image folder, or a ``.npz`` / ``.safetensors`` file from ``cvdd export``.
        spec: the real dataset's spec (class names and order, image size).

    Returns:
        images uint8 (N, 3, S, S) (the pixels; :func:`cvdd.data.augment.unit_float` gives their [0, 1] floats)
        and labels int64 (N,) in ``spec``'s class order, class-major.

    Raises:
        DataError: class names that do not match the dataset's, an empty class, a corrupt image, a file that is
            not a cvdd export, or images of another size in a tensor file.
    """
    p = Path(path)
    if p.is_dir():
        return load_image_folder(p, spec)
    if p.suffix == ".npz":
        pixels, labels, classes = _read_npz(p)
    else:
        pixels, labels, classes = _read_safetensors(p)
    return _to_spec(pixels, labels, classes, spec, p)


def load_image_folder(path: str | os.PathLike[str], spec: DatasetSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<path>/<class>/<image>`` (or ``<path>/train/<class>/<image>``) as a synthetic set.

    Args:
        path: the folder.
        spec: the real dataset's spec; its class names must be exactly the folder's class names.

    Returns:
        images uint8 (N, 3, S, S) and labels int64 (N,), class-major in ``spec``'s class order.

    Raises:
        DataError: missing or unknown class folders, an empty class folder, a corrupt image.
    """
    root = Path(path)
    # The Hugging Face layout (`cvdd export --format hf`) nests the classes under train/.
    if (root / "train").is_dir() and "train" not in spec.classes:
        root = root / "train"
    found = {
        e.name: Path(e.path)
        for e in os.scandir(root)
        if e.is_dir() and not e.name.startswith(".") and not (Path(e.path) / "labels.json").is_file()
    }
    _check_class_names(sorted(found), spec, str(root))
    arrays, labels, resized = [], [], 0
    for label, cls in enumerate(spec.classes):
        files = _images_under(found[cls])
        if not files:
            raise DataError(f"class folder {found[cls]} has no images")
        for f in files:
            arr = decode_image(f.read_bytes(), spec.image_size, str(f.relative_to(root)))
            resized += _size_of(f) != (spec.image_size, spec.image_size)
            arrays.append(arr)
            labels.append(label)
    if resized:
        log.warning("%s: %d images are not %d px; resized and centre-cropped", root, resized, spec.image_size)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels, dtype=torch.int64)


def describe_external_set(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``cvdd info`` says about an external set, read from headers only (no image is decoded).

    Args:
        path: a ``.npz`` or ``.safetensors`` file from ``cvdd export``, or a folder of class sub-folders of images
            (``png``/``jpeg``/``hf`` exports, or the user's own).

    Returns:
        ``kind``, ``path``, ``dataset`` (None for a folder: it names no dataset), ``classes``, ``images``,
        ``ipc`` (an int, or ``"a-b"`` when classes differ) and ``image_size`` (``"HxW"``, of the first image for a
        folder).

    Raises:
        DataError: a file that is not a cvdd export, or a folder without class sub-folders of images.
    """
    p = Path(path)
    if p.is_dir():
        # The Hugging Face layout nests the classes under train/ (beside which test/ or validation/ may sit); a
        # train/ holding images itself is a class named "train" (the reader decides it from the dataset's classes).
        train = p / "train"
        entries = list(os.scandir(train)) if train.is_dir() else []
        own_images = any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
        nested = any(e.is_dir() for e in entries) and not own_images
        root = train if nested else p
        counts: dict[str, int] = {}
        first: Path | None = None
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            if e.is_dir() and not e.name.startswith(".") and not (Path(e.path) / "labels.json").is_file():
                files = _images_under(Path(e.path))
                counts[e.name] = len(files)
                first = first or (files[0] if files else None)
        if first is None:
            raise DataError(f"{p} holds no class sub-folders of images (nor a cvdd artifact)")
        w, h = _size_of(first)
        return _description("image folder", p, None, counts, f"{h}x{w}")
    try:
        if p.suffix == ".npz":
            with zipfile.ZipFile(p) as zf, zf.open("images.npy") as fh:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
                shape = read(fh)[0]  # (N, H, W, 3)
            with np.load(p, allow_pickle=False) as z:
                labels, classes, dataset = z["labels"], [str(c) for c in z["classes"]], str(z["dataset"])
            size, kind = f"{shape[1]}x{shape[2]}", "exported set (npz)"
        else:
            from safetensors import safe_open

            with safe_open(str(p), framework="np") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != _EXPORT_KIND:
                    raise DataError(f"{p} is not a cvdd export (no kind {_EXPORT_KIND!r} in its header)")
                shape = f.get_slice("images").get_shape()  # (N, 3, H, W)
                labels = f.get_tensor("labels")
            classes, dataset = [str(c) for c in json.loads(meta["classes"])], meta.get("dataset")
            size, kind = f"{shape[2]}x{shape[3]}", "exported set (safetensors)"
    except DataError:
        raise
    except Exception as exc:  # a truncated zip, a missing member or header field: not an export cvdd can read
        raise DataError(f"{p} is not a readable cvdd export: {str(exc).splitlines()[0]}") from None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{p}: labels outside 0..{len(classes) - 1}")
    per_class = np.bincount(labels, minlength=len(classes))
    return _description(kind, p, dataset, dict(zip(classes, per_class.tolist())), size)


def _description(kind: str, path: Path, dataset: str | None, counts: dict[str, int], size: str) -> dict[str, Any]:
    """The ``info`` fields of an external set with ``counts`` images per class."""
    low, high = min(counts.values()), max(counts.values())
    return {
        "kind": kind,
        "path": str(path),
        "dataset": dataset,
        "classes": len(counts),
        "images": sum(counts.values()),
        "ipc": low if low == high else f"{low}-{high}",
        "image_size": size,
    }


def _images_under(folder: Path) -> list[Path]:
    """Image files in ``folder`` and its sub-folders, sorted by relative path (the set's order)."""
    out = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def _size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the image header (no decoding); (0, 0) when unreadable (decode reports it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):
        return (0, 0)


def _check_class_names(names: list[str], spec: DatasetSpec, where: str) -> None:
    """One-line error unless ``names`` are exactly the dataset's class names."""
    unknown = sorted(set(names) - set(spec.classes))
    missing = [c for c in spec.classes if c not in set(names)]
    if unknown or missing:
        raise DataError(
            f"the classes of {where} do not match those of dataset '{spec.name}' "
            f"(unknown: {unknown[:5] or '-'}; missing: {missing[:5] or '-'}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''})"
        )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """images (N, 3, H, W) uint8, labels (N,), class names of an ``.npz`` export (stored (N, H, W, 3))."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:  # truncated: BadZipFile
        raise DataError(f"{path} is not a cvdd export (.npz with images, labels, classes): {exc}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, classes


def _read_safetensors(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """images (N, 3, H, W) uint8, labels (N,), class names of a ``.safetensors`` export."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != _EXPORT_KIND:
                raise DataError(
                    f"{path} is neither a cvdd export nor a recover output (no {path.with_suffix('.json').name})"
                )
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        classes = [str(c) for c in json.loads(meta["classes"])]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"unreadable export {path}: {str(exc).splitlines()[0]}") from None
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{path}: images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.numpy(), labels.numpy(), classes


def _to_spec(
    pixels: np.ndarray, labels: np.ndarray, classes: list[str], spec: DatasetSpec, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check names and size, and renumber the labels into ``spec``'s class order (matched by name)."""
    if len(set(classes)) != len(classes):
        raise DataError(f"{path}: a class name is listed twice in its classes")
    _check_class_names(classes, spec, str(path))
    if labels.ndim != 1 or len(labels) != len(pixels) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be integers (N,) with one per image; got {labels.dtype} {tuple(labels.shape)} "
            f"for {len(pixels)} images"
        )
    if pixels.shape[-1] != spec.image_size or pixels.shape[-2] != spec.image_size:
        raise DataError(
            f"{path} holds {pixels.shape[-2]}x{pixels.shape[-1]} images, but '{spec.name}' uses {spec.image_size} px"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
    counts = np.bincount(labels.astype(np.int64), minlength=len(classes)) if labels.size else np.zeros(len(classes))
    if (counts == 0).any():
        raise DataError(f"{path}: class {classes[int(np.argmin(counts))]!r} has no image")
    index = torch.tensor([spec.classes.index(c) for c in classes], dtype=torch.int64)
    new_labels = index[torch.from_numpy(labels.astype(np.int64))]
    # Class-major in the dataset's order (stable, so each class keeps its IPC order).
    order = torch.argsort(new_labels, stable=True)
    return torch.from_numpy(pixels)[order], new_labels[order]
