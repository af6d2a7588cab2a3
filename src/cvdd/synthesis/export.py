"""``cvdd export``: a recovered synthetic set in formats other tools read.

Every format holds the same pixels: the images of ``synthetic.safetensors`` as uint8 (float32 images in [0, 1]
rounded, ``round(255 x)``, as recover's ``store=uint8`` stores them; a uint8 set as it is), so an export read back
by ``cvdd evaluate`` gives the same tensors as the uint8-quantised original. JPEG (quality 75, as the official
code) is the one lossy format.

* ``png`` / ``jpeg``: an ImageFolder, ``<out>/<class>/<class>_<k>.png`` with k the IPC index;
* ``npz``: one NumPy file, ``images`` uint8 (N, H, W, 3), ``labels`` int64 (N,), ``classes`` str (C,),
  ``dataset`` str;
* ``safetensors``: one file, ``images`` uint8 (N, 3, H, W) and ``labels`` int64 (N,); the class names (JSON
  list), dataset name and IPC are in the header metadata, so the file needs no sidecar;
* ``hf``: ``<out>/train/<class>/<class>_<k>.png``, the layout Hugging Face ``datasets`` reads with
  ``load_dataset("imagefolder", data_dir=out)``. Its ``label`` feature numbers the class folders in sorted
  order, which is cvdd's order unless the dataset was loaded with an explicit ``class_order``; no
  ``metadata.csv`` is written, because with one the ``imagefolder`` builder drops the labels it infers from
  the folders.

Images are class-major (all IPC indices of class 0 first), as in ``synthetic.safetensors``. An export never
overwrites: the destination must not exist (or be an empty folder), and it appears complete or not at all
(written under a temporary name, then renamed).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from cvdd.artifacts import atomic_write_bytes, temp_sibling
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "EXPORT_KIND", "export_path", "export_synthetic", "to_uint8"]

#: Formats of :func:`export_synthetic`.
EXPORT_FORMATS = ("png", "jpeg", "npz", "safetensors", "hf")
#: ``kind`` in the header metadata of an exported safetensors file (how a reader recognises one).
EXPORT_KIND = "cvdd-export"
#: File written inside ``out`` by the single-file formats when ``out`` does not already name the file.
_FILE_NAMES = {"npz": "images.npz", "safetensors": "images.safetensors"}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise images to bytes the way every cvdd export does.

    Args:
        images: (N, 3, H, W) float in [0, 1] (values outside are clamped), or uint8 (returned as is).

    Returns:
        (N, 3, H, W) uint8, ``round(255 x)``.
    """
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def export_path(out: str | os.PathLike[str], fmt: str) -> Path:
    """Where :func:`export_synthetic` writes: the folder ``out``, or for ``npz``/``safetensors`` the file.

    ``out`` ending in ``.npz`` (``.safetensors``) names the file itself; otherwise the file is
    ``out/images.npz`` (``out/images.safetensors``).
    """
    _check_format(fmt)
    out_path = Path(out)
    if fmt in _FILE_NAMES and out_path.suffix != f".{fmt}":
        return out_path / _FILE_NAMES[fmt]
    return out_path


def export_synthetic(path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "png") -> int:
    """Write a synthetic set (recover's output) in one of :data:`EXPORT_FORMATS`.

    Args:
        path: ``synthetic.safetensors`` or the recover output folder holding it.
        out: destination folder (or file, for ``npz``/``safetensors``; see :func:`export_path`).
        fmt: ``png``, ``jpeg``, ``npz``, ``safetensors`` or ``hf``.

    Returns:
        The number of images written.

    Raises:
        ConfigError: unknown format, or the destination already exists (exports never overwrite).
        ArtifactError: ``path`` is not a complete synthetic set.
    """
    from cvdd.synthesis.recover import load_synthetic

    _check_format(fmt)
    images, labels, meta = load_synthetic(path)
    spec = DatasetSpec.from_dict(meta["dataset"])
    ipc = int(meta["ipc"])
    pixels = to_uint8(images)
    dest = export_path(out, fmt)
    _check_free(dest)
    if fmt in ("png", "jpeg", "hf"):
        _check_folder_layout(labels, spec, ipc, path)
        _write_folder(pixels, labels, spec, ipc, dest, fmt)
    elif fmt == "npz":
        _write_npz(pixels, labels, spec, dest)
    else:
        _write_safetensors(pixels, labels, spec, ipc, dest)
    return len(labels)


def _check_folder_layout(labels: torch.Tensor, spec: DatasetSpec, ipc: int, source: str | os.PathLike[str]) -> None:
    """Refuse what would write files outside the export or onto each other: class names that are not one plain
    folder name (``../x``, ``a/b``, ``.hidden``, names equal up to case), or labels that are not ``ipc`` images of
    each class in order (files are named by IPC index).

    Raises:
        ArtifactError: naming the class or the layout, and the set it came from.
    """
    seen: dict[str, str] = {}
    for name in spec.classes:
        if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in ("/", "\\", "\0")):
            raise ArtifactError(f"{source}: class name {name!r} cannot be a folder name; export as npz or safetensors")
        if name.casefold() in seen:
            raise ArtifactError(f"{source}: class names {seen[name.casefold()]!r} and {name!r} would share one folder")
        seen[name.casefold()] = name
    expected = torch.arange(spec.num_classes).repeat_interleave(ipc)
    if ipc < 1 or not torch.equal(labels.cpu(), expected):
        raise ArtifactError(f"{source}: labels are not {ipc} images of each of the {spec.num_classes} classes in order")


def _check_format(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def _check_free(dest: Path) -> None:
    """Refuse an existing file or non-empty folder: mixing two exports would silently change a set."""
    if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
        raise ConfigError(f"export destination {dest} already exists; remove it or choose another --out")


def _write_folder(
    pixels: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, ipc: int, dest: Path, fmt: str
) -> None:
    """ImageFolder of PNG or JPEG files (``hf``: PNG under ``train/``), built aside and renamed into place."""
    from PIL import Image

    if fmt == "hf" and list(spec.classes) != sorted(spec.classes):
        log.warning(
            "%s: Hugging Face numbers the class folders in sorted order, which differs from this dataset's class "
            "order; map its labels by name (features['label'].names)",
            dest,
        )
    for stale in dest.parent.glob(f".{dest.name}.tmp*"):  # folders of an export killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_sibling(dest)
    root = tmp / "train" if fmt == "hf" else tmp
    suffix = "jpg" if fmt == "jpeg" else "png"
    hwc = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    try:
        for i in range(len(labels)):
            cls = spec.classes[int(labels[i])]
            folder = root / cls
            folder.mkdir(parents=True, exist_ok=True)
            # The IPC index in the name keeps the files' sorted order equal to the set's order on read-back.
            target = folder / f"{cls}_{i % ipc:0{max(4, len(str(ipc - 1)))}d}.{suffix}"
            if fmt == "jpeg":
                Image.fromarray(hwc[i]).save(target, format="JPEG", quality=75)
            else:
                Image.fromarray(hwc[i]).save(target, format="PNG")
        # The files reach the disk before the rename publishes them (a crash then leaves no folder of empty
        # images under the final name): one sync for the whole folder, not one fsync per image (50,000 at
        # ImageNet-1K IPC 50).
        if hasattr(os, "sync"):
            os.sync()
        if dest.is_dir():
            dest.rmdir()  # empty (checked before): the rename needs the name free
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_npz(pixels: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, dest: Path) -> None:
    """One compressed ``.npz``: images (N, H, W, 3) uint8, labels (N,) int64, classes (C,) str, dataset str."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        images=pixels.permute(0, 2, 3, 1).contiguous().numpy(),
        labels=labels.to(torch.int64).numpy(),
        # Fixed-width unicode, not objects, so np.load works without allow_pickle.
        classes=np.asarray(spec.classes, dtype=str),
        dataset=np.asarray(spec.name, dtype=str),
    )
    atomic_write_bytes(dest, buf.getvalue())


def _write_safetensors(pixels: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, ipc: int, dest: Path) -> None:
    """One self-describing safetensors file: images (N, 3, H, W) uint8, labels (N,) int64, classes in the header."""
    from safetensors.torch import save

    metadata = {
        "kind": EXPORT_KIND,
        "format": "1",
        "dataset": spec.name,
        "classes": json.dumps(list(spec.classes)),
        "ipc": str(ipc),
        "layout": "images: uint8 (N, 3, H, W), class-major; labels: int64 (N,) indexing classes",
    }
    data = save({"images": pixels.contiguous(), "labels": labels.to(torch.int64).contiguous()}, metadata=metadata)
    atomic_write_bytes(dest, data)
