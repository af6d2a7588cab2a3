"""Build stamps (which code made an artifact, the one-line warning when a resume mixes builds) and digests."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.artifacts import (
    StreamedTensorFile,
    _source_fingerprint,
    base_metadata,
    build_stamp,
    describe_build,
    distinct_builds,
    file_sha256,
    load_tensors,
    other_builds,
    pixel_digest,
    tensor_digest,
)
from cvdd.data.specs import DatasetSpec


def test_build_stamp_names_the_package_its_source_and_torch() -> None:
    stamp = build_stamp()
    assert stamp == {"cvdd": cvdd.__version__, "source": _source_fingerprint(), "torch": torch.__version__}
    assert re.fullmatch(r"[0-9a-f]{12}", stamp["source"])
    assert _source_fingerprint() == _source_fingerprint()  # deterministic (and computed once)
    spec = DatasetSpec("toy", ("a", "b"), 8, (0.5,) * 3, (0.25,) * 3)
    assert base_metadata("thing", spec)["build"] == stamp
    assert describe_build(stamp) == f"cvdd {cvdd.__version__} (source {stamp['source']}), torch {torch.__version__}"
    assert describe_build(None) == "an unrecorded build"


def test_other_builds_counts_what_another_build_made() -> None:
    now = build_stamp()
    assert other_builds("units", []) is None and other_builds("units", [now, now]) is None
    old = {**now, "source": "0123456789ab"}
    msg = other_builds("finished units in x", [now, old, None])
    assert msg is not None and msg.startswith("2 of 3 finished units in x were made by ")
    # Each other build is named once, sorted; this build last.
    assert "an unrecorded build; cvdd" in msg and "(source 0123456789ab)" in msg
    assert msg.endswith(
        f"not by this {describe_build(now)}: they are kept, and may differ from this build's at float rounding"
    )


def test_distinct_builds_lists_each_stamp_once_in_a_stable_order() -> None:
    now = build_stamp()
    old = {**now, "source": "0123456789ab"}
    assert distinct_builds([]) == [] and distinct_builds([now, now]) == [now]
    listed = distinct_builds([now, None, old, now])
    assert listed == distinct_builds([old, now, None])  # the order does not depend on the input's
    assert len(listed) == 3 and listed[0] is None and old in listed and now in listed


def test_pixel_digest_keys_a_uint8_set_as_its_float_copy() -> None:
    """Work keyed on a set's pixels (checkpoints, stored labels, rows) is found whether the set is held as uint8
    or float32: both hash as the float32 [0, 1] bytes, chunk by chunk, as tensor_digest hashed the float set."""
    u8 = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(5)
    f32 = u8.float() / 255
    assert pixel_digest(u8, labels) == pixel_digest(f32, labels) == tensor_digest(f32, labels)
    assert pixel_digest(u8) == tensor_digest(f32) != pixel_digest(u8, labels)
    from cvdd.artifacts import update_pixel_digest

    h = hashlib.sha256()
    update_pixel_digest(h, u8, chunk_rows=2)  # chunks of rows hash as the whole set
    assert h.hexdigest() == pixel_digest(u8)
    assert pixel_digest(u8[:, :, :, [1, 0, 2, 3]]) != pixel_digest(u8)


def test_tensor_digest_streams_rows_as_the_whole_bytes_would_hash() -> None:
    x = torch.arange(7 * 3 * 2, dtype=torch.float32).view(7, 3, 2)
    y = torch.tensor([3, 1, 4], dtype=torch.int64)
    whole = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    assert tensor_digest(x, y, chunk_rows=2) == tensor_digest(x, y) == whole
    assert tensor_digest(x.to(torch.uint8)) != tensor_digest(x)  # the dtype is part of the bytes
    assert tensor_digest(torch.tensor(1.0)) == hashlib.sha256(torch.tensor([1.0]).numpy().tobytes()).hexdigest()
    bf = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)  # numpy has no bfloat16: its 2 bytes per value
    assert tensor_digest(bf) == hashlib.sha256(bf.view(torch.int16).numpy().tobytes()).hexdigest()


def test_metadata_without_its_checksum_is_not_trusted(tmp_path) -> None:
    """Every cvdd writer records the tensors' sha256: metadata without one was edited, and checks nothing."""
    import json

    from cvdd.artifacts import load_tensors, save_tensors
    from cvdd.errors import ArtifactError

    path = tmp_path / "set.safetensors"
    save_tensors(path, {"x": torch.zeros(2)}, {"kind": "synthetic"})
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["sha256"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"set\.safetensors records no checksum"):
        load_tensors(path)


def test_text_with_a_lone_surrogate_is_written_escaped(tmp_path) -> None:
    """A folder name that is not UTF-8 reaches tables and reports as a lone surrogate; it is written, escaped."""
    from cvdd.artifacts import atomic_write_text

    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # Latin-1 bytes of a class folder, as os.listdir gives them
    atomic_write_text(tmp_path / "t.md", f"| {name} | 1 |\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "| caf\\udce9 | 1 |\n"


def test_streamed_tensor_file_is_a_safetensors_file_read_back_exactly(tmp_path: Path) -> None:
    """Rows written in any order, to their place in the file: safetensors reads the tensors back exactly, and so do
    load_tensors and its memory map (copy-on-write: writing to a mapped tensor never changes the file)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(0)
    want = {
        "x": torch.randn(5, 3, 2, 2, generator=gen),
        "labels": torch.arange(5),
        "u": torch.randint(0, 256, (4, 7), dtype=torch.uint8, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "set.safetensors"
    with StreamedTensorFile(path, {k: (v.dtype, tuple(v.shape)) for k, v in want.items()}) as f:
        for i in (3, 0, 4, 1, 2):
            f.write_rows("x", i, want["x"][i : i + 1])
        f.write_rows("labels", 0, want["labels"])
        f.write_rows("u", 1, want["u"][1:])
        f.write_rows("u", 0, want["u"][:1])
        f.write_rows("b", 0, want["b"])
        assert not path.exists()  # under a temporary name until finished
        f.finish({"kind": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.json", "set.safetensors"]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0  # the data starts 8-byte aligned, and each tensor at a multiple of its element size
    for k, v in want.items():
        assert header[k]["data_offsets"][0] % v.element_size() == 0, k
    for read in (load_file(str(path)), load_tensors(path)[0], load_tensors(path, mmap=True)[0]):
        assert read.keys() == want.keys()
        for k, v in want.items():
            assert read[k].dtype == v.dtype and torch.equal(read[k], v), k
    mapped, meta = load_tensors(path, mmap=True)
    assert meta["sha256"] == file_sha256(path) and meta["kind"] == "test"
    mapped["x"] += 1
    assert file_sha256(path) == meta["sha256"] and torch.equal(load_file(str(path))["x"], want["x"])


def test_streamed_tensor_file_publishes_nothing_unless_finished(tmp_path: Path) -> None:
    path = tmp_path / "set.safetensors"
    with pytest.raises(ValueError, match="do not fit"), StreamedTensorFile(path, {"x": (torch.float32, (2, 3))}) as f:
        f.write_rows("x", 1, torch.zeros(2, 3))  # one row too many
    assert list(tmp_path.iterdir()) == []
    with StreamedTensorFile(path, {"x": (torch.float32, (2, 3))}) as f:
        f.write_rows("x", 0, torch.zeros(2, 3))  # left without finish()
    assert list(tmp_path.iterdir()) == []
