"""Typed, versioned files between stages: safetensors tensors plus JSON metadata, written atomically.

Every file is first written under a temporary name in the same folder and then renamed, so a killed run
never leaves a half-written file that a later run would read as finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from cvdd import __version__
from cvdd.data.augment import unit_float
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ArtifactError


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
        digest = file_sha256(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_suffix(".json"), json.dumps({**meta, "sha256": digest}, indent=1, sort_keys=False))


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


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and its JSON metadata.

    Raises:
        ArtifactError: either file is missing or unreadable.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise ArtifactError(f"artifact not found or incomplete: {path} (needs {path.name} and {meta_path.name})")
    meta = read_json_object(meta_path)
    verify_checksum(path, meta)
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
