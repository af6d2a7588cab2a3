"""Faults while recovering: a tampered unit is never read as finished; a full disk keeps finished units."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import cvdd
from cvdd.cli import main
from cvdd.errors import ArtifactError

TINY = {"iterations": 3, "init": "real", "ipc_per_block": 1, "classes_per_block": 10}


def test_tampered_unit_is_detected_and_recomputed_with_restart(digit_experts: Path, digits, tmp_path: Path) -> None:
    first = cvdd.recover(digit_experts, tmp_path, dataset=digits, ipc=2, overrides=TINY, progress=False)
    unit = sorted((tmp_path / "units").glob("*.safetensors"))[0]
    data = bytearray(unit.read_bytes())
    data[-1] ^= 0xFF  # flip one bit of the last pixel
    unit.write_bytes(bytes(data))
    (tmp_path / "synthetic.json").unlink()
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        cvdd.recover(digit_experts, tmp_path, dataset=digits, ipc=2, overrides=TINY, progress=False)
    again = cvdd.recover(digit_experts, tmp_path, dataset=digits, ipc=2, overrides=TINY, restart=True, progress=False)
    assert again.units_run == 1 and (again.images == first.images).all()


def test_edited_unit_metadata_and_manifest_are_one_line_errors(digit_experts: Path, digits, tmp_path: Path) -> None:
    import json

    from cvdd.api import info

    cvdd.recover(digit_experts, tmp_path, dataset=digits, ipc=2, overrides=TINY, progress=False)
    (tmp_path / "synthetic.json").unlink()
    (tmp_path / "synthetic.safetensors").unlink()
    meta_path = sorted((tmp_path / "units").glob("*.json"))[0]
    meta = json.loads(meta_path.read_text())
    del meta["records"]  # the tensors' checksum still holds: only the metadata was edited
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="missing metadata fields"):
        cvdd.recover(digit_experts, tmp_path, dataset=digits, ipc=2, overrides=TINY, progress=False)
    with pytest.raises(ArtifactError, match="missing metadata fields"):
        cvdd.merge(tmp_path)
    manifest_path = tmp_path / "recover.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["units"][1] = {"key": "x", "classes": [0]}
    manifest_path.write_text(json.dumps(manifest))
    for call in (lambda: cvdd.merge(tmp_path), lambda: info(tmp_path)):
        with pytest.raises(ArtifactError, match=r"recover.json: a unit without its lists of IPC indices and classes"):
            call()


def test_disk_full_keeps_finished_units_and_gives_one_line(
    digit_experts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cvdd.synthesis.recover as rec

    real_save = rec.save_tensors
    calls = {"n": 0}

    def full_disk(path, tensors, meta):  # the second unit hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, tensors, meta)

    monkeypatch.setattr(rec, "save_tensors", full_disk)
    args = [
        "recover",
        "--experts",
        str(digit_experts),
        "--out",
        str(tmp_path),
        "--ipc",
        "2",
        "--iterations",
        "3",
        "--init",
        "real",
        "--set",
        "ipc_per_block=1",
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the "prior not measured" warning
    assert err.startswith("cvdd: error: cannot read or write") and "No space left on device" in err
    finished = list((tmp_path / "units").glob("*.json"))
    assert len(finished) == 1 and not list((tmp_path / "units").glob(".*tmp*"))
    monkeypatch.setattr(rec, "save_tensors", real_save)
    assert main(args) == 0
    assert len(list((tmp_path / "units").glob("*.json"))) == 2
