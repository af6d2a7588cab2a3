"""Typed, versioned files between stages: safetensors tensors plus JSON metadata, written atomically.

Every file is first written under a temporary name in the same folder and then renamed, so a killed run
never leaves a half-written file that a later run would read as finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cvdd import __version__
from cvdd.data.augment import unit_float
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ArtifactError

log = logging.getLogger(__name__)


def temp_sibling(path: Path) -> Path:
    """A temporary name beside ``path`` for a write that is then renamed into place (unique per host, process
    and call)."""
    # Host, pid and a random part: ranks on different hosts of a shared filesystem can share a pid.
    return path.with_name(f".{path.name}.tmp{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place (a crash then leaves the old file or the
    whole new one, never a renamed empty one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Text version of :func:`atomic_write_bytes`, UTF-8.

    A lone surrogate (a file name that is not UTF-8, decoded by Python with ``surrogateescape``: a class or dataset
    folder name) is written as its escape, ``\\udcff``, so reports and tables of such a dataset are still written.
    """
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through a temporary file and an atomic rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        torch.save(obj, tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` with ``weights_only=True`` (never unpickles code); errors become one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"checkpoint not found: {path}") from None
    except Exception as exc:
        raise ArtifactError(f"unreadable checkpoint {path}: {str(exc).splitlines()[0]}") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors as safetensors and ``meta`` as JSON beside them (``.json``), both atomically.

    The JSON is written last, so its presence marks a complete artifact, and it records the sha256 of the
    tensor file (``meta["sha256"]``), which :func:`load_tensors` verifies: a truncated or tampered file is
    never read as finished.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        _publish(tmp, path, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(tmp: Path, path: Path, meta: dict[str, Any]) -> None:
    """Move a finished tensor file ``tmp`` to ``path`` (fsynced, atomically), then write its metadata JSON with the
    file's sha256: the JSON's presence marks a complete artifact."""
    digest = file_sha256(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps({**meta, "sha256": digest}, indent=1, sort_keys=False))


#: safetensors dtype names of the dtypes cvdd writes, and the numpy dtype each is mapped as (bfloat16 as int16).
_ST_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.int16),
    torch.float64: ("F64", np.float64),
    torch.uint8: ("U8", np.uint8),
    torch.int8: ("I8", np.int8),
    torch.int16: ("I16", np.int16),
    torch.int32: ("I32", np.int32),
    torch.int64: ("I64", np.int64),
    torch.bool: ("BOOL", np.bool_),
}
_ST_NAMES = {name: (dtype, np_dtype) for dtype, (name, np_dtype) in _ST_DTYPES.items()}


class StreamedTensorFile:
    """A safetensors file written a block of rows at a time, for tensors too large to hold whole in memory.

    A synthetic set at ImageNet-1K IPC 50 is 28 GiB of float32: assembling it as one tensor and saving it with
    ``safetensors.save_file`` held the set and, while saving, much of a second copy. Here the header (every
    tensor's dtype, shape and place) is written first, rows go straight to their place in the file, and only what
    is being written is in memory. The file is a safetensors file like ``save_file``'s (an 8-byte header length, a
    JSON header padded to 8 bytes, the tensors' bytes back to back; ``tests/test_artifacts.py`` reads it with
    safetensors itself), published like
    :func:`save_tensors`: under a temporary name until :meth:`finish`, which records its sha256 in the JSON
    metadata written last. An exception inside ``with`` removes the temporary file.

    Args:
        path: the final ``.safetensors`` path.
        layout: name -> (dtype, shape).
    """

    def __init__(self, path: str | os.PathLike[str], layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._places: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        header: dict[str, Any] = {}
        offset = 0
        # Wider elements first (as safetensors orders them): every tensor then starts at a multiple of its element
        # size, so a memory-mapped view of it is aligned.
        order = sorted(layout, key=lambda k: -torch.empty((), dtype=layout[k][0]).element_size())
        for name, (dtype, shape) in ((k, layout[k]) for k in order):
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be written")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPES[dtype][0],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._places[name] = (dtype, tuple(shape), offset)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(text)
        self._tmp = temp_sibling(self.path)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(self._fd, struct.pack("<Q", len(text)) + text, 0)
            os.ftruncate(self._fd, self._data_start + offset)  # rows never written read as zeros
        except BaseException:
            self.abort()
            raise

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (shape ``(n, *shape[1:])``, the tensor's dtype) as rows ``start .. start + n`` of ``name``."""
        dtype, shape, offset = self._places[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or start < 0 or start + len(rows) > shape[0]:
            raise ValueError(f"{name}: rows {tuple(rows.shape)} {rows.dtype} at {start} do not fit {shape} {dtype}")
        if rows.numel() == 0:
            return
        rows = rows.detach().cpu().contiguous()
        if rows.dtype == torch.bfloat16:  # numpy has no bfloat16: its 2 bytes per value
            rows = rows.view(torch.int16)
        row_bytes = math.prod(shape[1:]) * rows.element_size()
        _pwrite_all(self._fd, memoryview(rows.numpy()).cast("B"), self._data_start + offset + start * row_bytes)

    def finish(self, meta: dict[str, Any]) -> None:
        """Publish the file under its final name, with ``meta`` (and the file's sha256) as its JSON metadata."""
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
            _publish(self._tmp, self.path, meta)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Close and remove the temporary file (nothing is published)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamedTensorFile:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self._fd >= 0:  # an error, or left without finish(): nothing is published
            self.abort()


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is written (a large write may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each backed by a private (copy-on-write) memory map of the file.

    Pages are read when touched and can be dropped again by the OS: a 28 GiB set costs no 28 GiB of host memory
    to hold, and writing to a tensor never changes the file. cvdd only ever replaces artifacts atomically (a
    rename), so the mapped inode is never truncated under a reader; the tensors hold the file (an open descriptor)
    until they are freed.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, np_dtype = _ST_NAMES[entry["dtype"]]
        shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        if end == begin:  # numpy cannot map zero bytes
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + begin, shape=shape)
        t = torch.from_numpy(arr)
        out[name] = t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    return out


def verify_checksum(path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Raise :class:`ArtifactError` when the file's sha256 differs from the one recorded in its metadata, or none
    is recorded (every cvdd writer records one: metadata without it was edited)."""
    expected = meta.get("sha256")
    if not expected:
        raise ArtifactError(f"the metadata of {path} records no checksum: it was not written by cvdd as it is")
    if file_sha256(path) != expected:
        raise ArtifactError(f"checksum mismatch for {path}: the file was modified or truncated after it was written")


def read_json_object(path: str | os.PathLike[str], what: str = "metadata") -> dict[str, Any]:
    """A JSON file that must hold an object (artifact metadata, manifests, rows).

    Raises:
        ArtifactError: unreadable, not JSON, not UTF-8, or not an object; naming ``what`` and the file.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"unreadable {what} {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"unreadable {what} {path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_tensors(
    path: str | os.PathLike[str], *, mmap: bool = False, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata.

    Args:
        path: the ``.safetensors`` file (its ``.json`` beside it).
        mmap: return tensors backed by a copy-on-write memory map of the file (large synthetic sets: pages are
            read as they are used) instead of reading it into memory.
        verify: check the file's sha256 against its metadata (only its writer, which has just hashed it, skips
            that).

    Raises:
        ArtifactError: either file is missing or unreadable.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ArtifactError(f"artifact not found or incomplete: {path} (needs {path.name} and {meta_path.name})")
    meta = read_json_object(meta_path)
    if verify:
        verify_checksum(path, meta)
    if mmap:
        try:
            return _mapped_tensors(path), meta
        except OSError as exc:
            # A private writable map is charged in full where the kernel does not overcommit (some HPC nodes):
            # read the file instead.
            log.warning("%s: cannot map (%s); reading it into memory instead", path, exc)
        except Exception as exc:
            raise ArtifactError(f"unreadable tensors {path}: {str(exc).splitlines()[0]}") from None
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"unreadable tensors {path}: {str(exc).splitlines()[0]}") from None
    return tensors, meta


#: Bytes of a set sent to the hash at once: whole 1,024-row chunks were 600 MB of float32 at 224 px, and their
#: ``tobytes`` copy as much again (1.15 GB above a 144 MB uint8 set while ``evaluate`` hashed it).
DIGEST_CHUNK_BYTES = 16 * 2**20


def tensor_digest(*tensors: torch.Tensor, chunk_rows: int | None = None) -> str:
    """sha256 (hex) of tensors' bytes in order, as the bytes of each whole tensor would hash.

    Rows go to the host and the hash a chunk at a time (``chunk_rows`` rows, default about
    :data:`DIGEST_CHUNK_BYTES`), so a large set on a GPU (ImageNet-1K IPC 50: 30 GB of float32) or in host memory
    is hashed without a second whole copy.

    Args:
        tensors: any shapes and dtypes, on any device; their dtypes are part of the bytes (uint8 and float32
            pixels of the same image differ).
        chunk_rows: rows per chunk (the digest does not depend on it).
    """
    h = hashlib.sha256()
    update_digest(h, *tensors, chunk_rows=chunk_rows)
    return h.hexdigest()


def _chunks(rows: torch.Tensor, chunk_rows: int | None, bytes_per_value: int) -> Any:
    """Consecutive row slices of ``rows`` of about :data:`DIGEST_CHUNK_BYTES` (``chunk_rows`` rows when given)."""
    if chunk_rows is None:
        per_row = max(1, rows[:1].numel() * bytes_per_value)
        chunk_rows = max(1, DIGEST_CHUNK_BYTES // per_row)
    for start in range(0, rows.shape[0], chunk_rows):
        yield rows[start : start + chunk_rows]


def update_digest(h: Any, *tensors: torch.Tensor, chunk_rows: int | None = None) -> None:
    """Feed tensors' bytes to a hashlib object ``h`` (see :func:`tensor_digest`)."""
    for t in tensors:
        t = t.detach()
        rows = t.reshape(-1) if t.dim() == 0 else t
        for chunk in _chunks(rows, chunk_rows, t.element_size()):
            chunk = chunk.cpu().contiguous()
            if chunk.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same 2 bytes per value
                chunk = chunk.view(torch.int16)
            h.update(chunk.numpy())  # the buffer itself: no bytes copy


def update_pixel_digest(h: Any, images: torch.Tensor, chunk_rows: int | None = None) -> None:
    """Feed a set's pixels to ``h`` as float32 in [0, 1], whatever their dtype.

    A uint8 set and its float32 copy (``x / 255``) hash alike, so keys of work done on a set (student checkpoints,
    stored labels, rows) do not change with how it is held; uint8 rows become floats a chunk at a time.

    Args:
        h: a hashlib object.
        images: (N, 3, S, S) uint8 in 0..255 or float in [0, 1], on any device.
        chunk_rows: rows per chunk (default about :data:`DIGEST_CHUNK_BYTES` of float32).
    """
    for chunk in _chunks(images.detach(), chunk_rows, 4):
        h.update(unit_float(chunk.cpu()).contiguous().numpy())


def pixel_digest(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """sha256 (hex) of a set: its pixels as :func:`update_pixel_digest` feeds them, then its labels' bytes."""
    h = hashlib.sha256()
    update_pixel_digest(h, images)
    if labels is not None:
        update_digest(h, labels)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _source_fingerprint() -> str:
    """Hash of the installed package's code and presets (computed once per process)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def build_stamp() -> dict[str, str]:
    """Which code made an artifact: cvdd's version, a hash of its source, and torch's version.

    The config hashes that decide what a re-run may resume describe the settings, not the code: a run resumed
    after cvdd or torch changed keeps its finished work (never lost), which may differ at float rounding from
    what this build would make. The stamp lets the resume say so (:func:`other_builds`).
    """
    # str(): torch.__version__ is a str subclass, which weights-only checkpoint loading refuses to unpickle.
    return {"cvdd": __version__, "source": _source_fingerprint(), "torch": str(torch.__version__)}


def describe_build(stamp: dict[str, str] | None) -> str:
    """``cvdd 0.1.0 (source 1a2b3c4d5e6f), torch 2.14.1``; ``an unrecorded build`` for older artifacts."""
    if not stamp:
        return "an unrecorded build"
    return f"cvdd {stamp.get('cvdd')} (source {stamp.get('source')}), torch {stamp.get('torch')}"


def distinct_builds(stamps: list[dict[str, str] | None]) -> list[dict[str, str] | None]:
    """The different stamps among ``stamps``, in a stable order (what an assembled artifact lists)."""
    return [json.loads(b) for b in sorted({json.dumps(s, sort_keys=True) for s in stamps})]


def other_builds(what: str, stamps: list[dict[str, str] | None]) -> str | None:
    """One warning line when any of the reused artifacts' stamps differs from this build's, else None.

    Args:
        what: what is reused, plural, e.g. ``"finished recover units in runs/x"``.
        stamps: the ``build`` field of each reused artifact (None where it has none).
    """
    now = build_stamp()
    others = [s for s in stamps if s != now]
    if not others:
        return None
    kinds = sorted({describe_build(s) for s in others})
    return (
        f"{len(others)} of {len(stamps)} {what} were made by {'; '.join(kinds)}, not by this "
        f"{describe_build(now)}: they are kept, and may differ from this build's at float rounding"
    )


def base_metadata(kind: str, spec: DatasetSpec) -> dict[str, Any]:
    """Fields every artifact carries: kind, format version, package version, dataset spec, creation time."""
    return {
        "kind": kind,
        "format": 1,
        "cvdd_version": __version__,
        "torch_version": torch.__version__,
        "build": build_stamp(),
        "dataset": spec.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_kind(meta: dict[str, Any], kind: str, path: str | os.PathLike[str]) -> DatasetSpec:
    """Validate an artifact's kind and return its dataset spec.

    Raises:
        ArtifactError: the file is another kind of artifact or lacks a dataset spec.
    """
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path} is not a cvdd {kind} (kind: {meta.get('kind')!r})")
    try:
        return DatasetSpec.from_dict(meta["dataset"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} has no valid dataset description ({exc})") from None
