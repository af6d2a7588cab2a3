"""Shared fixtures: real data slices built in temporary folders, never next to ../shared."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from forkserver import ForkServer

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = Path(os.environ.get("CVDD_CIFAR10_TAR", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test writes its dataset caches into a temporary folder, never into ~/.cache."""
    os.environ["CVDD_CACHE"] = str(tmp_path_factory.mktemp("cvdd-cache"))
    os.environ.pop("CVDD_DEVICE", None) if os.environ.get("CVDD_DEVICE") == "" else None
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def _extract_slice(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """Copy the first N train and M test images of every class out of the CIFAR-10 tarball."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real CIFAR-10 tarball not found at {CIFAR_TAR} (set CVDD_CIFAR10_TAR)")
    limits = {"train": train_per_class, "test": test_per_class}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[-3] not in limits:
                continue
            split, cls = parts[-3], parts[-2]
            if counts.get((split, cls), 0) >= limits[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            target = dest / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(member)
            assert f is not None
            target.write_bytes(f.read())
    return dest


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real CIFAR-10 ImageFolder (100 train + 20 test images per class) in a temporary folder."""
    return _extract_slice(tmp_path_factory.mktemp("cifar-slice"), 100, 20)


@pytest.fixture
def tiny_folder(tmp_path: Path, cifar_slice: Path) -> Path:
    """A private, mutable copy of 5 train + 2 test images of 3 classes (for bad-input tests)."""
    import shutil

    for split, n in (("train", 5), ("test", 2)):
        for cls in ("airplane", "cat", "ship"):
            files = sorted((cifar_slice / split / cls).iterdir())[:n]
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            for f in files:
                shutil.copy(f, tmp_path / "ds" / split / cls / f.name)
    return tmp_path / "ds"


@pytest.fixture(scope="session")
def digits():
    from cvdd.api import load_dataset

    return load_dataset("digits", progress=False)


@pytest.fixture(scope="session")
def digit_experts(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """A tiny committee (convnet_d3_w32, resnet8; 3 epochs) squeezed on the embedded digits, shared read-only."""
    import cvdd

    out = tmp_path_factory.mktemp("digit-experts")
    cvdd.squeeze(digits, archs=["convnet_d3_w32", "resnet8"], out=out, epochs=3, progress=False)
    return out


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """Runs ``cvdd`` commands as forked children of one pre-imported process (``tests/forkserver.py``)."""
    server = ForkServer(tmp_path_factory.mktemp("fork-logs"))
    yield server
    server.close()
