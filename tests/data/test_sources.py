from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvdd.data.sources import FileSplit, TensorSplit, _strip_prefix, load_dataset
from cvdd.data.specs import CIFAR10_CLASSES, DatasetSpec
from cvdd.errors import DataError


def test_digits_read_from_scikit_learns_file_equal_load_digits() -> None:
    from sklearn.datasets import load_digits

    from cvdd.data.sources import _digits_arrays

    images, target = _digits_arrays()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(target, bunch.target)


def test_a_digits_command_imports_neither_scikit_learn_nor_torchvision() -> None:
    # Each costs about 2 s at every start on a 2 GHz core; only CIFAR via torchvision, 224 px nets and
    # training augmentation need torchvision.
    import subprocess
    import sys

    code = (
        "import sys, cvdd; cvdd.load_dataset('digits', progress=False); "
        "from cvdd.models import create_model; create_model('resnet8', 10, 32); "
        "print(sorted(m for m in ('sklearn', 'torchvision') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_digits_is_real_balanced_and_split(digits) -> None:
    assert digits.spec.name == "digits" and digits.spec.num_classes == 10 and digits.spec.image_size == 32
    assert isinstance(digits.train, TensorSplit)
    assert digits.train.images.dtype == torch.uint8 and digits.train.images.shape[1:] == (3, 32, 32)
    assert len(digits.train) + len(digits.test) == 1797
    assert 340 <= len(digits.test) <= 380
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 30
    # The grey scans are replicated to RGB: the three channels are identical.
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])
    assert 0.0 < digits.spec.std[0] < 1.0


def test_imagefolder_slice_loads_with_cifar_constants(cifar_slice: Path) -> None:
    ds = load_dataset(cifar_slice, progress=False)
    assert ds.spec.classes == CIFAR10_CLASSES
    assert ds.spec.name == "cifar10" and ds.spec.mean[0] == pytest.approx(0.4914)
    assert ds.train.images.shape == (1000, 3, 32, 32)
    assert ds.test.images.shape == (200, 3, 32, 32)
    assert torch.equal(torch.bincount(ds.train.labels), torch.full((10,), 100))


def test_uint8_cache_is_reused_and_invalidated(cifar_slice: Path, tmp_path: Path) -> None:
    first = load_dataset(cifar_slice, cache_dir=tmp_path, progress=False)
    second = load_dataset(cifar_slice, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and second.from_cache
    assert torch.equal(first.train.images, second.train.images)
    assert first.fingerprint == second.fingerprint
    assert len(list((tmp_path / "datasets").glob("*.safetensors"))) == 1


def test_cache_key_follows_content(tiny_folder: Path, tmp_path: Path) -> None:
    a = load_dataset(tiny_folder, cache_dir=tmp_path, progress=False)
    victim = sorted((tiny_folder / "train" / "cat").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim, format="JPEG")
    b = load_dataset(tiny_folder, cache_dir=tmp_path, progress=False)
    assert not b.from_cache and a.fingerprint != b.fingerprint


def test_tarball_equals_folder(tiny_folder: Path, tmp_path: Path) -> None:
    tar_path = tmp_path / "mini.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tiny_folder, arcname="mini")
    from_dir = load_dataset(tiny_folder, progress=False)
    from_tar = load_dataset(tar_path, progress=False)
    assert from_tar.spec.classes == ("airplane", "cat", "ship")
    assert torch.equal(from_dir.train.images, from_tar.train.images)
    assert torch.equal(from_dir.test.labels, from_tar.test.labels)


def test_a_shuffled_tarball_is_read_in_its_stored_order_and_equals_the_folder(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members stored out of class order (tar of a shuffled listing) decode to the folder's tensors, and are read
    front to back: a gzip stream read backwards restarts from its start at every jump (quadratic)."""
    import random

    files = sorted(p for p in tiny_folder.rglob("*") if p.is_file())
    random.Random(0).shuffle(files)
    tar_path = tmp_path / "shuffled.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f"mini/{f.relative_to(tiny_folder).as_posix()}")
    offsets: list[int] = []
    real_extract = tarfile.TarFile.extractfile

    def spy(self: tarfile.TarFile, member: tarfile.TarInfo | str):  # type: ignore[no-untyped-def]
        assert isinstance(member, tarfile.TarInfo)
        offsets.append(member.offset)
        return real_extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    from_tar = load_dataset(tar_path, progress=False)
    monkeypatch.undo()
    from_dir = load_dataset(tiny_folder, progress=False)
    assert torch.equal(from_dir.train.images, from_tar.train.images)
    assert torch.equal(from_dir.train.labels, from_tar.train.labels)
    assert torch.equal(from_dir.test.images, from_tar.test.images)
    n_train, n_test = len(from_dir.train), len(from_dir.test)
    assert not from_tar.from_cache and len(offsets) > n_train + n_test  # probe, then both splits
    probe, train, test = offsets[: -n_train - n_test], offsets[-n_train - n_test : -n_test], offsets[-n_test:]
    assert probe == sorted(probe) and train == sorted(train) and test == sorted(test)


def test_explicit_class_order(tiny_folder: Path) -> None:
    ds = load_dataset(tiny_folder, class_order=["ship", "airplane", "cat"], progress=False)
    assert ds.spec.classes == ("ship", "airplane", "cat")
    with pytest.raises(DataError, match="class order"):
        load_dataset(tiny_folder, class_order=["ship", "airplane"], progress=False)


def test_grey_rgba_and_odd_sized_images_are_handled(tiny_folder: Path) -> None:
    Image.new("L", (40, 36), 128).save(tiny_folder / "train" / "cat" / "grey.png")
    Image.new("RGBA", (31, 33), (10, 20, 30, 128)).save(tiny_folder / "train" / "cat" / "rgba.png")
    ds = load_dataset(tiny_folder, progress=False)
    assert ds.train.images.shape == (17, 3, 32, 32)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_the_file(tiny_folder: Path, damage: str) -> None:
    victim = sorted((tiny_folder / "train" / "ship").iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(DataError, match=rf"corrupt or unreadable image .*{victim.name}"):
        load_dataset(tiny_folder, progress=False)


def test_train_test_class_mismatch(tiny_folder: Path) -> None:
    (tiny_folder / "test" / "ship").rename(tiny_folder / "test" / "boat")
    with pytest.raises(DataError, match=r"different classes .*only in train: \['ship'\].*\['boat'\]"):
        load_dataset(tiny_folder, progress=False)


def test_empty_class_folder(tiny_folder: Path) -> None:
    (tiny_folder / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/dog has no images"):
        load_dataset(tiny_folder, progress=False)


def test_missing_path_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset path does not exist"):
        load_dataset(tmp_path / "nowhere" / "data.tar.gz", progress=False)
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", progress=False)
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset(tmp_path, progress=False)


def test_a_known_name_warns_of_data_with_another_class_count(tiny_folder: Path, caplog) -> None:
    ds = load_dataset("cifar100", data=tiny_folder, progress=False)  # a subset is allowed, and said
    assert ds.spec.name == "cifar100" and ds.spec.num_classes == 3
    assert "'cifar100' has 100 classes, but the data given for it has 3" in caplog.text


def test_a_broken_link_in_a_class_folder_is_named(tiny_folder: Path) -> None:
    (tiny_folder / "train" / "cat" / "zz.png").symlink_to(tiny_folder / "gone.png")
    with pytest.raises(DataError, match=r"cannot read image .*zz\.png"):
        load_dataset(tiny_folder, progress=False)


def test_named_dataset_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", cache_dir=tmp_path, progress=False)
    with pytest.raises(DataError, match="needs --data"):
        load_dataset("imagenette", progress=False)


def test_tiny_imagenet_val_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    lines = []
    for cls in ("n01", "n02"):
        (root / "train" / cls / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                root / "train" / cls / "images" / f"{cls}_{i}.JPEG"
            )
    (root / "val" / "images").mkdir(parents=True)
    for i, cls in enumerate(("n01", "n02", "n01")):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"v{i}.JPEG")
        lines.append(f"v{i}.JPEG\t{cls}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    # As downloaded, a test/ of unlabelled images sits beside val/: it cannot be scored, so val/ is the test split.
    (root / "test" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "test" / "images" / "t0.JPEG")
    ds = load_dataset(root, cache_dir=tmp_path / "cache", progress=False)
    assert ds.spec.image_size == 64 and ds.spec.classes == ("n01", "n02")
    assert ds.test.labels.tolist() == [0, 0, 1]
    # new labels in the annotations (same image files): not the cached decoding of the old ones
    # the same layout packed as a tarball: the annotations label val/, the unlabelled test/ is skipped
    tar_path = tmp_path / "tiny.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname="tiny")
    packed = load_dataset(tar_path, cache_dir=tmp_path / "cache", progress=False)
    assert packed.spec.classes == ds.spec.classes and packed.test.labels.tolist() == [0, 0, 1]
    assert torch.equal(packed.test.images, ds.test.images) and torch.equal(packed.train.images, ds.train.images)
    swapped = [line.replace("\tn01\t", "\tnXX\t").replace("\tn02\t", "\tn01\t").replace("nXX", "n02") for line in lines]
    (root / "val" / "val_annotations.txt").write_text("\n".join(swapped))
    again = load_dataset(root, cache_dir=tmp_path / "cache", progress=False)
    assert not again.from_cache and again.test.labels.tolist() == [0, 1, 1]


def test_a_tarball_that_cannot_be_extracted_is_a_data_error_and_leaves_no_partial_copy(tmp_path: Path) -> None:
    """Large images are extracted, not decoded: a member the safe extraction filter refuses (an absolute link)
    gives one line, and the half-written folder is removed."""
    import io

    tar_path = tmp_path / "big.tar"
    with tarfile.open(tar_path, "w") as tar:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                buf = io.BytesIO()
                Image.new("RGB", (96, 96), (40, 80, 120)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{cls}/0.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
        link = tarfile.TarInfo("train/a/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"cannot extract .*big\.tar into .*: "):
        load_dataset(tar_path, cache_dir=cache, progress=False)
    assert not [p for p in (cache / "extracted").iterdir() if ".tmp-" in p.name]


def test_large_images_stream_from_files(tiny_folder: Path) -> None:
    from cvdd.data.loader import make_batches

    ds = load_dataset(tiny_folder, image_size=224, progress=False)
    assert isinstance(ds.train, FileSplit) and ds.spec.large
    batches = make_batches(ds.train, ds.spec, 4, torch.device("cpu"), train=True, workers=0)
    x, y = next(iter(batches.epoch(torch.Generator().manual_seed(0))))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 224, 224) and y.shape == (4,)


def test_spec_round_trip_and_compatibility() -> None:
    spec = DatasetSpec("a", ("x", "y"), 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    other = DatasetSpec("b", ("x", "y", "z"), 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(DataError, match="3 classes"):
        spec.check_compatible(other, "expert e")
    swapped = DatasetSpec("c", ("y", "x"), 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(DataError, match="class order differs"):
        spec.check_compatible(swapped, "expert e")
    # Statistics computed from data differ in the 7th digit between reduction orders: the same normalisation.
    rounding = DatasetSpec("a", ("x", "y"), 32, (0.50000075, 0.5, 0.5), (0.2, 0.2, 0.19999962))
    spec.check_compatible(rounding, "expert e")
    assert rounding.input_key() == spec.input_key()
    renormed = DatasetSpec("a", ("x", "y"), 32, (0.485, 0.456, 0.406), (0.2, 0.2, 0.2))
    with pytest.raises(DataError, match=r"made with normalisation mean \[0.485"):
        spec.check_compatible(renormed, "expert e")
    assert renormed.input_key() != spec.input_key()


def test_subset_is_balanced_and_seeded(digits) -> None:
    a = digits.train.subset(3, 10, seed=1)
    b = digits.train.subset(3, 10, seed=1)
    assert torch.equal(a.images, b.images)
    assert torch.equal(torch.bincount(a.labels), torch.full((10,), 3))
    with pytest.raises(DataError, match="fewer than"):
        digits.train.subset(10_000, 10)


@pytest.mark.parametrize(
    ("member", "split", "prefix"),
    [
        ("train/cat/a.jpg", "train", ""),
        ("cifar10/train/cat/a.jpg", "train", "cifar10/"),
        ("pretrain/train/cat/a.jpg", "train", "pretrain/"),  # "train/" inside a folder name is no split folder
        ("interval/val/cat/a.jpg", "val", "interval/"),
        ("data/set/test/cat/a.jpg", "test", "data/set/"),
    ],
)
def test_tar_member_prefix_is_a_whole_folder(member: str, split: str, prefix: str) -> None:
    assert _strip_prefix(member, split) == prefix


def test_a_corrupt_streamed_image_is_one_line_naming_the_file(tiny_folder: Path) -> None:
    from cvdd.data.loader import make_batches

    victim = sorted((tiny_folder / "train" / "ship").iterdir())[0]
    ds = load_dataset(tiny_folder, image_size=224, progress=False)  # streamed: files are read by the workers
    victim.write_bytes(b"not an image at all")
    batches = make_batches(ds.train, ds.spec, 16, torch.device("cpu"), train=False, workers=1)
    with pytest.raises(DataError) as err:
        list(batches.epoch())
    assert str(err.value).startswith(f"corrupt or unreadable image {victim}") and "\n" not in str(err.value)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    import io

    from cvdd.data.sources import decode_image

    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    out = decode_image(buf.getvalue(), 32, "ramp.png")
    expected = np.clip(np.round(ramp / 257.0), 0, 255).astype(np.uint8)
    assert out.shape == (32, 32, 3) and np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert (out == 255).mean() < 0.01  # convert("RGB") alone made 99.6% of it white


def test_a_killed_extraction_leaves_no_copy_behind(tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    tar_path = tmp_path / "mini.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tiny_folder, arcname="mini")
    cache = tmp_path / "cache"
    first = load_dataset(tar_path, image_size=224, cache_dir=cache, progress=False)
    (root,) = (cache / "extracted").iterdir()
    assert Path(first.train.files[0]).is_file() and (root / ".complete").is_file()
    # A run killed mid-extraction (its process gone) and one killed between the rename and the marker.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{int(gone.stdout)}")
    leftover.mkdir()
    (leftover / "half.jpg").write_bytes(b"x")
    older_cvdd = root.with_name(f"{root.name}.tmp{int(gone.stdout)}")
    older_cvdd.mkdir()
    recent = root.with_name(f"{root.name}.tmp-{socket.gethostname()}-{int(gone.stdout) + 1}")
    recent.mkdir()  # not a day old: kept (it may be another container's live extraction)
    day_old = time.time() - 2 * 86400
    for d in (leftover, older_cvdd):
        os.utime(d, (day_old, day_old))
    other_host = root.with_name(f"{root.name}.tmp-elsewhere-1")
    other_host.mkdir()
    os.utime(other_host, (day_old, day_old))
    (root / ".complete").unlink()
    again = load_dataset(tar_path, image_size=224, cache_dir=cache, progress=False)
    assert again.train.files == first.train.files and (root / ".complete").is_file()
    assert sorted(p.name for p in (cache / "extracted").iterdir()) == sorted([root.name, other_host.name, recent.name])
    # A new decoding format re-decodes small datasets but does not extract a large tarball again.
    monkeypatch.setattr("cvdd.data.sources.CACHE_FORMAT", 99)
    load_dataset(tar_path, image_size=224, cache_dir=cache, progress=False)
    assert sorted(p.name for p in (cache / "extracted").iterdir()) == sorted([root.name, other_host.name, recent.name])
