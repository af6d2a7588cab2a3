"""``cvdd export`` formats and ``cvdd evaluate`` on an external image folder (round trips on the embedded digits)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cvdd.api import evaluate, export
from cvdd.artifacts import base_metadata, save_tensors
from cvdd.cli import build_parser, main
from cvdd.data.external import is_external_set, load_external_set, load_image_folder
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ConfigError, DataError
from cvdd.evaluation.student import random_real_set
from cvdd.synthesis.export import EXPORT_FORMATS, EXPORT_KIND, export_path, export_synthetic, to_uint8
from cvdd.synthesis.recover import SYNTHETIC_KIND, load_synthetic

IPC = 2
#: A student run small enough for a round trip: one seed, two epochs, online soft labels from the committee.
TINY_EVAL = {"epochs": 2, "seeds": [0], "label_mode": "online"}


def _make_set(folder: Path, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, store_uint8: bool) -> Path:
    """A ``synthetic.safetensors`` written the way recover writes it (float32, or uint8 as ``store=uint8``)."""
    stored = (images * 255).round().to(torch.uint8) if store_uint8 else images
    meta = base_metadata(SYNTHETIC_KIND, spec)
    meta.update({"method": "test", "ipc": IPC, "seed": 0, "order": "class-major"})
    save_tensors(folder / "synthetic.safetensors", {"images": stored, "labels": labels}, meta)
    return folder


@pytest.fixture
def uint8_set(digits: Any, tmp_path: Path) -> Path:
    """IPC 2 digits set stored as uint8 pixels (what PNG holds exactly)."""
    images, labels = random_real_set(digits, IPC, seed=3)
    return _make_set(tmp_path / "syn", images, labels, digits.spec, store_uint8=True)


@pytest.fixture
def float_set(digits: Any, tmp_path: Path) -> Path:
    """IPC 2 set with float32 pixels off the uint8 grid, as recover produces by default."""
    images, labels = random_real_set(digits, IPC, seed=4)
    noisy = (images + 0.01 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return _make_set(tmp_path / "float", noisy, labels, digits.spec, store_uint8=False)


def test_png_export_evaluates_exactly_like_the_original(uint8_set: Path, digit_experts: Path, digits: Any) -> None:
    out = uint8_set.parent / "png"
    assert export(uint8_set, out) == 10 * IPC
    assert sorted(p.name for p in (out / "3").iterdir()) == ["3_0000.png", "3_0001.png"]
    original, labels, _ = load_synthetic(uint8_set)
    images, read_labels = load_external_set(out, digits.spec)
    assert torch.equal(images, original) and torch.equal(read_labels, labels)
    a = evaluate(uint8_set, digit_experts, overrides=TINY_EVAL, dataset=digits, progress=False)
    b = evaluate(out, digit_experts, overrides=TINY_EVAL, dataset=digits, progress=False)
    assert a.accs == b.accs


@pytest.mark.parametrize("fmt", ["png", "npz", "safetensors", "hf"])
def test_lossless_formats_read_back_the_uint8_pixels(float_set: Path, digits: Any, fmt: str) -> None:
    """Every export holds round(255 x) of the float32 set; reading it back gives exactly those pixels."""
    out = float_set.parent / f"out-{fmt}"
    assert export_synthetic(float_set, out, fmt) == 10 * IPC
    original, labels, _ = load_synthetic(float_set)
    dest = export_path(out, fmt)
    assert is_external_set(dest)
    images, read_labels = load_external_set(dest, digits.spec)
    assert images.dtype == torch.uint8 and torch.equal(images, to_uint8(original))
    assert torch.equal(read_labels, labels)
    assert not torch.equal(images, original)  # the float set really was off the uint8 grid


def test_file_formats_layout(float_set: Path, digits: Any) -> None:
    export_synthetic(float_set, float_set.parent / "x.npz", "npz")
    with np.load(float_set.parent / "x.npz", allow_pickle=False) as z:
        assert z["images"].shape == (10 * IPC, 32, 32, 3) and z["images"].dtype == np.uint8
        assert z["labels"].dtype == np.int64 and list(z["labels"][:3]) == [0, 0, 1]
        assert list(z["classes"]) == list(digits.spec.classes) and str(z["dataset"]) == "digits"
    export_synthetic(float_set, float_set.parent / "st", "safetensors")
    from safetensors import safe_open

    with safe_open(str(float_set.parent / "st" / "images.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert meta["kind"] == EXPORT_KIND and json.loads(meta["classes"]) == list(digits.spec.classes)
        assert f.get_tensor("images").shape == (10 * IPC, 3, 32, 32) and f.get_tensor("images").dtype == torch.uint8
    export_synthetic(float_set, float_set.parent / "hf", "hf")
    assert sorted(p.name for p in (float_set.parent / "hf").iterdir()) == ["train"]
    assert len(list((float_set.parent / "hf" / "train").rglob("*.png"))) == 10 * IPC


def test_hf_export_loads_with_datasets(float_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline (read when `datasets` is imported): the imagefolder builder ships with the library, nothing is fetched.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (`.[dev]` has it)")
    out = float_set.parent / "hf"
    export_synthetic(float_set, out, "hf")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))["train"]
    original, labels, meta = load_synthetic(float_set)
    assert len(ds) == len(labels) and ds.features["label"].names == meta["dataset"]["classes"]
    pixels = to_uint8(original)
    for i in (0, len(ds) - 1):
        row = ds[i]
        arr = torch.from_numpy(np.array(row["image"].convert("RGB"))).permute(2, 0, 1)
        assert row["label"] == int(labels[i]) and torch.equal(arr, pixels[i])


def test_jpeg_is_lossy_but_readable(float_set: Path, digits: Any) -> None:
    out = float_set.parent / "jpg"
    assert export_synthetic(float_set, out, "jpeg") == 10 * IPC
    images, _ = load_external_set(out, digits.spec)
    original, _, _ = load_synthetic(float_set)
    assert images.shape == original.shape and (images / 255 - original).abs().mean() < 0.1


def test_export_never_overwrites_and_checks_the_format(uint8_set: Path) -> None:
    out = uint8_set.parent / "png"
    export_synthetic(uint8_set, out, "png")
    with pytest.raises(ConfigError, match="already exists"):
        export_synthetic(uint8_set, out, "png")
    export_synthetic(uint8_set, uint8_set.parent / "a.npz", "npz")
    with pytest.raises(ConfigError, match="already exists"):
        export_synthetic(uint8_set, uint8_set.parent / "a.npz", "npz")
    (uint8_set.parent / "empty").mkdir()
    assert export_synthetic(uint8_set, uint8_set.parent / "empty", "png") == 10 * IPC  # an empty folder is fine
    with pytest.raises(ConfigError, match="unknown export format 'tiff'"):
        export_synthetic(uint8_set, uint8_set.parent / "t", "tiff")
    assert not list(uint8_set.parent.glob(".*tmp*"))  # no temporary leftovers


def test_cli_export_formats_and_old_import(uint8_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvdd.synthesis.recover import export_imagefolder  # the old name still works

    assert export_imagefolder(uint8_set, uint8_set.parent / "old") == 10 * IPC
    assert main(["export", str(uint8_set), "--out", str(uint8_set.parent / "n"), "--format", "npz", "-q"]) == 0
    assert f"wrote {10 * IPC} images (npz) to {uint8_set.parent / 'n' / 'images.npz'}" in capsys.readouterr().out
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]  # type: ignore[union-attr]
    (fmt,) = [a for a in export_parser._actions if a.dest == "format"]
    assert tuple(fmt.choices) == EXPORT_FORMATS


def test_folder_reader_follows_the_dataset_class_order(tmp_path: Path) -> None:
    """Labels index the spec's classes (not the sorted folders); HF nesting, labels/ and odd sizes are handled."""
    from PIL import Image

    spec = DatasetSpec("toy", ("zebra", "apple"), 16, (0.5,) * 3, (0.5,) * 3)
    root = tmp_path / "set" / "train"
    for value, cls in ((10, "zebra"), (200, "apple")):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(root / cls / "b.png")
        Image.fromarray(np.full((16, 16, 3), value + 1, np.uint8)).save(root / cls / "a.png")
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(root / "zebra" / "c.png")  # odd size: resized
    (root / "labels").mkdir()
    (root / "labels" / "labels.json").write_text("{}")  # stored soft labels beside the images: not a class
    images, labels = load_image_folder(tmp_path / "set", spec)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert images[:, 0, 0, 0].tolist() == [11, 10, 7, 201, 200]  # sorted file names per class
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8


def test_folder_errors_are_one_line(tmp_path: Path) -> None:
    from PIL import Image

    spec = DatasetSpec("toy", ("cat", "dog"), 8, (0.5,) * 3, (0.5,) * 3)
    root = tmp_path / "f"
    for cls in ("cat", "dgo"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / cls / "0.png")
    with pytest.raises(
        DataError, match=r"do not match those of dataset 'toy' \(unknown: \['dgo'\]; missing: \['dog'\]\)"
    ):
        load_image_folder(root, spec)
    (root / "dgo").rename(root / "dog")
    (root / "dog" / "0.png").unlink()
    with pytest.raises(DataError, match=r"class folder .*dog has no images"):
        load_image_folder(root, spec)
    (root / "dog" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"corrupt or unreadable image dog/0.png"):
        load_image_folder(root, spec)
    (tmp_path / "run" / "units").mkdir(parents=True)  # an unfinished recover output is not an image folder
    assert not is_external_set(tmp_path / "run") and is_external_set(root)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DataError, match=r"unreadable export|neither a cvdd export"):
        load_external_set(tmp_path / "bad.safetensors", spec)


def test_cli_evaluate_reads_a_folder_and_reports_wrong_classes(
    uint8_set: Path, digit_experts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = uint8_set.parent / "png"
    export_synthetic(uint8_set, out, "png")
    common = ["--experts", str(digit_experts), "--epochs", "1", "--seeds", "0", "-q"]
    # Stored labels land in <folder>/labels; reading the folder again must skip them.
    for _ in range(2):
        assert main(["evaluate", str(out), "--labels", "stored", *common]) == 0
        assert "top-1 on the real test set" in capsys.readouterr().out
    assert (out / "labels" / "labels.json").is_file()
    (out / "3").rename(out / "three")
    assert main(["evaluate", str(out), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown: ['three']; missing: ['3']" in err


def test_default_label_folder_of_a_dataset_with_a_class_named_labels(tmp_path: Path) -> None:
    """A class folder named ``labels`` is a class: stored labels go to ``.labels`` (hidden from the reader)."""
    from PIL import Image

    from cvdd.api import _default_label_dir

    spec = DatasetSpec("toy", ("labels", "other"), 8, (0.5,) * 3, (0.5,) * 3)
    root = tmp_path / "set"
    for cls in spec.classes:
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / cls / "0.png")
    assert _default_label_dir(root, None) == root / ".labels"
    (root / ".labels").mkdir()
    (root / ".labels" / "labels.json").write_text("{}")
    _, labels = load_image_folder(root, spec)  # the labels folder is not read as a class
    assert labels.tolist() == [0, 1]
    plain = tmp_path / "plain"
    (plain / "cat").mkdir(parents=True)
    assert _default_label_dir(plain, None) == plain / "labels"
    (plain / "labels").mkdir()
    (plain / "labels" / "labels.json").write_text("{}")  # labels already stored there: still that folder
    assert _default_label_dir(plain, None) == plain / "labels"


@pytest.mark.parametrize(
    ("classes", "labels", "message"),
    [
        (("../x", "b"), [0, 0, 1, 1], "class name '../x' cannot be a folder name"),
        (("a/b", "c"), [0, 0, 1, 1], "class name 'a/b' cannot be a folder name"),
        ((".hidden", "c"), [0, 0, 1, 1], "class name '.hidden' cannot be a folder name"),
        (("Cat", "cat"), [0, 0, 1, 1], "class names 'Cat' and 'cat' would share one folder"),
        (("a", "b"), [0, 0, 0, 1], "labels are not 2 images of each of the 2 classes in order"),
    ],
)
def test_a_folder_export_refuses_names_and_layouts_that_would_misplace_files(classes, labels, message) -> None:
    """Class names become folders and IPC indices file names: nothing may land outside the export or on another
    file (a tampered or foreign set's metadata)."""
    from cvdd.errors import ArtifactError
    from cvdd.synthesis.export import _check_folder_layout

    spec = DatasetSpec("t", classes, 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ArtifactError, match=f"^set: {re.escape(message)}"):
        _check_folder_layout(torch.tensor(labels), spec, 2, "set")
    _check_folder_layout(torch.tensor([0, 0, 1, 1]), DatasetSpec("t", ("a", "b"), 32, (0.5,) * 3, (0.2,) * 3), 2, "s")


def test_info_describes_every_export_from_headers(uint8_set: Path, tmp_path: Path) -> None:
    """`cvdd info` on an export: dataset, classes, images, IPC and size, for the file and the folder formats."""
    from cvdd.api import info

    expected = {"classes": 10, "images": 10 * IPC, "ipc": IPC, "image_size": "32x32"}
    for fmt, kind, dataset in (
        ("npz", "exported set (npz)", "digits"),
        ("safetensors", "exported set (safetensors)", "digits"),
        ("png", "image folder", None),
        ("hf", "image folder", None),
    ):
        dest = export_path(tmp_path / fmt, fmt)
        export(uint8_set, tmp_path / fmt, format=fmt)
        got = info(dest)
        assert got == {"kind": kind, "path": str(dest), "dataset": dataset, **expected}, (fmt, got)
    (tmp_path / "png" / "labels").mkdir()  # stored labels beside the images (evaluate --labels stored): not a class
    (tmp_path / "png" / "labels" / "labels.json").write_text("{}")
    assert info(tmp_path / "png")["kind"] == "image folder"
    (tmp_path / "png" / "3" / "3_0001.png").unlink()  # an uneven folder says so
    assert info(tmp_path / "png")["ipc"] == f"{IPC - 1}-{IPC}"
    assert main(["info", str(tmp_path / "npz" / "images.npz"), "-q"]) == 0
    hf = tmp_path / "hf"
    (hf / "test" / "0").mkdir(parents=True)  # a test split beside the HF train/: still the nesting
    assert info(hf)["classes"] == 10 and info(hf)["images"] == 10 * IPC
    (tmp_path / "png" / "train").mkdir()  # a class named "train" (images of its own): not the HF nesting
    (tmp_path / "png" / "train" / "x.png").write_bytes((tmp_path / "png" / "3" / "3_0000.png").read_bytes())
    assert info(tmp_path / "png")["classes"] == 11
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no class sub-folders of images"):
        info(tmp_path / "junk")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"bad.npz is not a readable cvdd export"):
        info(tmp_path / "bad.npz")
