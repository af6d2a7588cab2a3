"""The bad-input matrix (issue 6): every bad input ends in ONE stderr line ``cvdd: error: ...`` and exit status 2.

Each case builds its bad input from tiny real files in ``tmp_path`` (32 px PNG/JPEG images written with PIL),
runs the CLI in-process and checks the status and the message. The "handled" cases (grey, RGBA, palette and
odd-sized images, ...) must succeed instead. Cases that need experts share the session's ``digit_experts``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvdd.cli import main

CLASSES = ("airplane", "cat", "ship")
SQUEEZE = ["squeeze", "--arch", "convnet_d3_w32", "--epochs", "1"]  # the cheapest command that loads a dataset
RECOVER = ["recover", "--ipc", "1", "--iterations", "2", "--init", "real"]


class Ctx:
    """What a case builder gets: its own temporary folder and, only when asked for, the shared digit experts."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest) -> None:
        self.tmp = tmp
        self._request = request

    @property
    def experts(self) -> Path:
        return self._request.getfixturevalue("digit_experts")


@pytest.fixture
def ctx(tmp_path: Path, request: pytest.FixtureRequest) -> Ctx:
    return Ctx(tmp_path, request)


# ----------------------------------------------------------------------------------------------- tiny real files


def image_bytes(seed: str, size: tuple[int, int] = (32, 32), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A random-noise image (width, height) in PIL ``mode``, encoded as ``fmt``; seeded by ``seed``."""
    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(str(path.name) + str(path.parent.name), **kw))
    return path


def folder(root: Path, classes: tuple[str, ...] = CLASSES, train: int = 4, test: int = 2, **kw) -> Path:
    """An ImageFolder ``root/{train,test}/<class>/<i>.png`` of 32 px random images."""
    for split, n in (("train", train), ("test", test)):
        for cls in classes:
            for i in range(n):
                write_image(root / split / cls / f"{i}.png", **kw)
    return root


def ok(*argv: str) -> None:
    """Run a setup command that must succeed."""
    assert main([*argv, "--quiet"]) == 0, f"setup command failed: cvdd {' '.join(argv)}"


def squeeze_on(ds: Path, out: Path) -> list[str]:
    return [*SQUEEZE, "--dataset", str(ds), "--out", str(out)]


# ----------------------------------------------------------------------------------------------- case builders
# Each builder makes its bad input under ctx.tmp and returns the command line to run.


def missing_dataset_path(c: Ctx) -> list[str]:
    return squeeze_on(c.tmp / "no" / "such-folder", c.tmp / "out")


def unknown_dataset_name(c: Ctx) -> list[str]:
    return [*SQUEEZE, "--dataset", "mnist", "--out", str(c.tmp / "out")]


def empty_class_folder(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "train" / "dog").mkdir()
    (ds / "test" / "dog").mkdir()
    write_image(ds / "test" / "dog" / "0.png")
    return squeeze_on(ds, c.tmp / "out")


def class_folder_without_images(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    for f in (ds / "test" / "cat").iterdir():
        f.rename(f.with_suffix(".txt"))  # only non-image files left
    return squeeze_on(ds, c.tmp / "out")


def no_test_split(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    shutil.rmtree(ds / "test")
    return squeeze_on(ds, c.tmp / "out")


def corrupt_png(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "train" / "cat" / "2.png").write_bytes(np.random.default_rng(0).bytes(3000))
    return squeeze_on(ds, c.tmp / "out")


def corrupt_first_image(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "train" / "airplane" / "0.png").write_bytes(np.random.default_rng(1).bytes(3000))
    return squeeze_on(ds, c.tmp / "out")


def empty_image_file(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "test" / "ship" / "1.png").write_bytes(b"")
    return squeeze_on(ds, c.tmp / "out")


def truncated_png(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    victim = ds / "train" / "ship" / "3.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return squeeze_on(ds, c.tmp / "out")


def truncated_jpeg(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    data = image_bytes("jpeg", fmt="JPEG")
    (ds / "train" / "cat" / "9.jpg").write_bytes(data[: len(data) // 2])
    return squeeze_on(ds, c.tmp / "out")


def truncated_tarball(c: Ctx) -> list[str]:
    import tarfile

    ds = folder(c.tmp / "ds", train=20)
    tar_path = c.tmp / "ds.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(ds, arcname="ds")
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])
    return squeeze_on(tar_path, c.tmp / "out")


def not_a_tarball(c: Ctx) -> list[str]:
    bad = c.tmp / "data.tar.gz"
    bad.write_bytes(b"this is not a tarball")
    return squeeze_on(bad, c.tmp / "out")


def mode_images(mode: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        ds = folder(c.tmp / "ds", mode=mode)
        return squeeze_on(ds, c.tmp / "out")

    return build


def cmyk_jpeg_and_16bit_png(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "train" / "cat" / "cmyk.jpg").write_bytes(image_bytes("cmyk", mode="CMYK", fmt="JPEG"))
    deep = np.random.default_rng(2).integers(0, 65535, (32, 32), dtype=np.uint16)
    Image.fromarray(deep).save(ds / "train" / "ship" / "deep.png")
    write_image(ds / "test" / "airplane" / "grey-alpha.png", mode="LA")
    return squeeze_on(ds, c.tmp / "out")


def odd_sized_images(c: Ctx) -> list[str]:
    """Odd sizes among 32 px images (one of them the first file of its class) are resized to 32 px."""
    ds = folder(c.tmp / "ds")
    write_image(ds / "train" / "airplane" / "0-wide.png", size=(50, 37))
    write_image(ds / "train" / "cat" / "tall.png", size=(20, 90))
    write_image(ds / "test" / "ship" / "tiny.jpg", size=(7, 5), fmt="JPEG")
    ok(*squeeze_on(ds, c.tmp / "out"))
    return ["info", str(c.tmp / "out" / "convnet_d3_w32.json")]


def stray_files_are_ignored(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    (ds / "train" / "cat" / "notes.txt").write_text("not an image")
    (ds / "train" / ".DS_Store").write_bytes(b"\0\1")
    (ds / "train" / "ship" / "._0.png").write_bytes(b"resource fork")  # hidden: skipped, not read as corrupt
    return squeeze_on(ds, c.tmp / "out")


def split_has_extra_class(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    write_image(ds / "test" / "dog" / "0.png")
    return squeeze_on(ds, c.tmp / "out")


def split_misses_a_class(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    shutil.rmtree(ds / "test" / "cat")
    return squeeze_on(ds, c.tmp / "out")


def recover_on(c: Ctx, *extra: str, experts: Path | None = None) -> list[str]:
    return [*RECOVER, "--experts", str(experts or c.experts), "--out", str(c.tmp / "syn"), *extra]


def expert_other_class_count(c: Ctx) -> list[str]:
    return recover_on(c, "--dataset", str(folder(c.tmp / "ds")))


def expert_other_class_names(c: Ctx) -> list[str]:
    return recover_on(c, "--dataset", str(folder(c.tmp / "ds", classes=tuple("abcdefghij"), train=1, test=1)))


def expert_other_image_size(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds", classes=tuple("0123456789"), train=1, test=1, size=(64, 64))
    return recover_on(c, "--dataset", str(ds))


def evaluate_with_expert_of_other_dataset(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds")
    return ["evaluate", "random-real", "--ipc", "1", "--experts", str(c.experts), "--dataset", str(ds)]


def pool_mixes_datasets(c: Ctx) -> list[str]:
    """A pool folder holding a digits expert and an expert squeezed on another (3-class) dataset."""
    ok(*squeeze_on(folder(c.tmp / "ds"), c.tmp / "other"))
    pool = c.tmp / "pool"
    pool.mkdir()
    for ext in (".safetensors", ".json"):
        shutil.copy(c.experts / f"convnet_d3_w32{ext}", pool / f"convnet_d3_w32{ext}")
        shutil.copy(c.tmp / "other" / f"convnet_d3_w32{ext}", pool / f"zz_other{ext}")
    return recover_on(c, experts=pool)


def no_experts(c: Ctx) -> list[str]:
    (c.tmp / "empty").mkdir()
    return recover_on(c, experts=c.tmp / "empty")


def unknown_pool_member(c: Ctx) -> list[str]:
    return recover_on(c, "--pool", "convnet_d3_w32", "vit_huge")


def unknown_architecture(c: Ctx) -> list[str]:
    return ["squeeze", "--arch", "resnet9000", "--out", str(c.tmp / "out")]


def architecture_without_this_size(c: Ctx) -> list[str]:
    ds = folder(c.tmp / "ds", size=(224, 224), train=1, test=1)
    return [*SQUEEZE[:2], "resnet8", "--epochs", "1", "--dataset", str(ds), "--out", str(c.tmp / "out")]


def unknown_student(c: Ctx) -> list[str]:
    return ["evaluate", "random-real", "--ipc", "1", "--experts", str(c.experts), "--student", "resnet9000"]


def recover_ipc_zero(c: Ctx) -> list[str]:
    return recover_on(c, "--ipc", "0")


def random_real_ipc(ipc: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        return ["evaluate", "random-real", "--ipc", ipc, "--experts", str(c.experts), "--epochs", "1"]

    return build


def committee_larger_than_pool(c: Ctx) -> list[str]:
    return recover_on(c, "--committee-size", "3")


def experts_whose_dataset_is_gone(command: str) -> Callable[[Ctx], list[str]]:
    """A copy of the digit experts whose metadata names a dataset tarball that no longer exists."""

    def build(c: Ctx) -> list[str]:
        import shutil

        moved = c.tmp / "experts"
        shutil.copytree(c.experts, moved)
        for meta_path in moved.glob("*.json"):
            meta = json.loads(meta_path.read_text())
            meta["dataset_source"] = str(c.tmp / "gone.tar.gz")
            meta_path.write_text(json.dumps(meta))
        if command == "ablate":
            return ["ablate", "--experts", str(moved), "--out", str(c.tmp / "abl")]
        return ["recover", "--experts", str(moved), "--out", str(c.tmp / "syn"), "--ipc", "1", "--init", "real"]

    return build


def with_set(command: str, *settings: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        sets = [a for s in settings for a in ("--set", s)]
        if command == "squeeze":
            return [*squeeze_on(folder(c.tmp / "ds"), c.tmp / "out"), *sets]
        return recover_on(c, *sets)

    return build


def expert_of_another_width(c: Ctx) -> list[str]:
    """An expert whose metadata names a wider variant of its architecture: same tensor names, other shapes."""
    moved = c.tmp / "experts"
    shutil.copytree(c.experts, moved)
    meta_path = moved / "convnet_d3_w32.json"
    meta = json.loads(meta_path.read_text())
    meta["arch"] = "convnet_d3_w64"
    meta_path.write_text(json.dumps(meta))
    (moved / "results.json").write_text("[]")  # a JSON list beside the experts (a pipeline's table) is skipped
    return recover_on(c, experts=moved)


def truncated_npz(c: Ctx) -> list[str]:
    path = c.tmp / "set.npz"
    images = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(10), classes=np.array([str(i) for i in range(10)]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["evaluate", str(path), "--experts", str(c.experts), "--labels", "hard", "--epochs", "1"]


def npz_with(labels: np.ndarray, classes: list[str]) -> Callable[[Ctx], list[str]]:
    """A `cvdd export`-style .npz of ten images whose labels or class names are malformed."""

    def build(c: Ctx) -> list[str]:
        path = c.tmp / "set.npz"
        np.savez(path, images=np.zeros((10, 32, 32, 3), dtype=np.uint8), labels=labels, classes=np.array(classes))
        return ["evaluate", str(path), "--experts", str(c.experts), "--labels", "hard", "--epochs", "1"]

    return build


def tampered_unit(command: str) -> Callable[[Ctx], list[str]]:
    """A finished unit whose recorded sha256 was edited: recover refuses to resume, merge refuses to assemble."""

    def build(c: Ctx) -> list[str]:
        ok(*recover_on(c))
        meta_path = sorted((c.tmp / "syn" / "units").glob("*.json"))[0]
        meta = json.loads(meta_path.read_text())
        meta["sha256"] = "0" * 64
        meta_path.write_text(json.dumps(meta))
        return recover_on(c) if command == "recover" else ["merge", str(c.tmp / "syn")]

    return build


def merge_not_a_run(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    write_image(c.tmp / "syn" / "grid.png")
    return ["merge", str(c.tmp / "syn")]


def merge_other_manifest_kind(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    (c.tmp / "syn" / "recover.json").write_text(json.dumps({"kind": "expert"}))
    return ["merge", str(c.tmp / "syn")]


def merge_truncated_manifest(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    (c.tmp / "syn" / "recover.json").write_text('{"kind": "recover-manifest", "dataset": {"na')
    return ["merge", str(c.tmp / "syn")]


def merge_manifest_of_another_shape(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    (c.tmp / "syn" / "recover.json").write_text('{"kind": "recover-manifest", "units": 3}')
    return ["merge", str(c.tmp / "syn")]


def info_of_metadata_not_utf8(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    (c.tmp / "syn" / "synthetic.json").write_bytes(b'{"kind": "synthetic\xff\xfe"}')
    return ["info", str(c.tmp / "syn")]


def export_of_metadata_that_is_a_list(c: Ctx) -> list[str]:
    (c.tmp / "syn").mkdir()
    (c.tmp / "syn" / "synthetic.safetensors").write_bytes(b"x")
    (c.tmp / "syn" / "synthetic.json").write_text("[1, 2]")
    return ["export", str(c.tmp / "syn"), "--out", str(c.tmp / "out")]


def preset_file_path(c: Ctx) -> list[str]:
    """Presets are chosen by name; a YAML file path (here with an unknown key) is not a preset."""
    preset = c.tmp / "mine.yaml"
    preset.write_text("mine:\n  archs: [convnet_d3_w32]\n  recipe: {epochs: 1, lrr: 0.1}\n")
    return ["squeeze", "--preset", str(preset), "--out", str(c.tmp / "out")]


def shard(text: str) -> Callable[[Ctx], list[str]]:
    def build(c: Ctx) -> list[str]:
        return ["recover", "--experts", str(c.tmp / "never-read"), "--out", str(c.tmp / "syn"), "--shard", text]

    return build


# ----------------------------------------------------------------------------------------------- the matrix
# (builder, expected exit status, text expected in the stderr line (status 2) or on stdout (status 0));
# "{tmp}" stands for the case's temporary folder.


def distill_of_a_dataset_without_its_own_preset(c: Ctx) -> list[str]:
    return ["distill", "--dataset", "cifar10", "--data", str(c.tmp / "nowhere")]  # refused before any read


def distill_of_a_mistyped_folder(c: Ctx) -> list[str]:
    return ["distill", "--dataset", str(c.tmp / "nowhere" / "imgs")]  # not "needs --preset": the path is wrong


def distill_with_unknown_student(c: Ctx) -> list[str]:
    return ["distill", "--set", "student=resnet1B", "--out", str(c.tmp / "run")]  # refused before the squeeze


def relabel_with_unknown_preset(c: Ctx) -> list[str]:
    return ["relabel", "random-real", "--ipc", "1", "--experts", str(c.experts), "--preset", "digitz"]


def ablate_with_empty_experts_folder(c: Ctx) -> list[str]:
    (c.tmp / "empty").mkdir()
    return ["ablate", "--experts", str(c.tmp / "empty")]


def info_of_a_json_list(c: Ctx) -> list[str]:
    (c.tmp / "synthetic.json").write_text("[1, 2]")
    return ["info", str(c.tmp)]


def bad_tracker(c: Ctx) -> list[str]:
    return ["evaluate", "random-real", "--experts", str(c.tmp / "nowhere"), "--track", "tensorbord"]


def fixed_committee_of_another_size(c: Ctx) -> list[str]:
    names = [p.stem for p in sorted(c.experts.glob("*.safetensors"))]
    return recover_on(c, "--committee", "fixed", "--set", f"fixed=[{names[0]}]")


CASES = [
    # 1. missing dataset path, 15. unknown dataset name
    pytest.param(missing_dataset_path, 2, "dataset path does not exist: {tmp}/no/such-folder", id="missing-path"),
    pytest.param(unknown_dataset_name, 2, "unknown dataset 'mnist'", id="unknown-dataset-name"),
    pytest.param(no_test_split, 2, "{tmp}/ds has train/ but neither test/ nor val/", id="no-test-split"),
    # 2. empty class folders
    pytest.param(empty_class_folder, 2, "class folder {tmp}/ds/train/dog has no images", id="empty-class-folder"),
    pytest.param(class_folder_without_images, 2, "{tmp}/ds/test/cat has no images", id="class-only-non-images"),
    # 3. corrupt and 4. truncated images: the message names the file
    pytest.param(corrupt_png, 2, "corrupt or unreadable image train/cat/2.png", id="corrupt-png"),
    pytest.param(corrupt_first_image, 2, "corrupt or unreadable image train/airplane/0.png", id="corrupt-first-png"),
    pytest.param(empty_image_file, 2, "corrupt or unreadable image test/ship/1.png", id="empty-image-file"),
    pytest.param(truncated_png, 2, "corrupt or unreadable image train/ship/3.png", id="truncated-png"),
    pytest.param(truncated_jpeg, 2, "corrupt or unreadable image train/cat/9.jpg", id="truncated-jpeg"),
    pytest.param(truncated_tarball, 2, "truncated or corrupt tarball {tmp}/ds.tar.gz", id="truncated-tarball"),
    pytest.param(not_a_tarball, 2, "cannot open {tmp}/data.tar.gz as a tarball", id="not-a-tarball"),
    # 5. non-RGB and 6. odd-sized images are handled, not fatal
    pytest.param(mode_images("L"), 0, "convnet_d3_w32", id="handled-grey-L"),
    pytest.param(mode_images("RGBA"), 0, "convnet_d3_w32", id="handled-RGBA"),
    pytest.param(mode_images("P"), 0, "convnet_d3_w32", id="handled-palette-P"),
    pytest.param(mode_images("1"), 0, "convnet_d3_w32", id="handled-bilevel-1"),
    pytest.param(cmyk_jpeg_and_16bit_png, 0, "convnet_d3_w32", id="handled-CMYK-16bit-LA"),
    pytest.param(odd_sized_images, 0, "image_size        32", id="handled-odd-sizes-stay-32px"),
    pytest.param(stray_files_are_ignored, 0, "convnet_d3_w32", id="handled-stray-files"),
    # 7. train/test class mismatch
    pytest.param(split_has_extra_class, 2, "only in train: -; only in test: ['dog']", id="test-has-extra-class"),
    pytest.param(split_misses_a_class, 2, "only in train: ['cat']; only in test: -", id="test-misses-a-class"),
    # 8. experts made for another dataset, class list or image size; a pool mixing datasets
    pytest.param(
        expert_other_class_count, 2, "dataset 'digits' with 10 classes, but 'ds' has 3", id="expert-3-classes"
    ),
    pytest.param(expert_other_class_names, 2, "class order differs from 'ds' (0:0!=a", id="expert-other-class-names"),
    pytest.param(expert_other_image_size, 2, "made for 32 px images, but 'ds' uses 64 px", id="expert-other-size"),
    pytest.param(evaluate_with_expert_of_other_dataset, 2, "but 'ds' has 3", id="evaluate-expert-3-classes"),
    pytest.param(pool_mixes_datasets, 2, "the experts disagree: expert zz_other", id="pool-mixes-datasets"),
    pytest.param(no_experts, 2, "no experts found in {tmp}/empty", id="no-experts"),
    pytest.param(unknown_pool_member, 2, "expert 'vit_huge' not found", id="unknown-pool-member"),
    # 9. unknown architecture
    pytest.param(unknown_architecture, 2, "unknown architecture 'resnet9000'", id="unknown-arch"),
    pytest.param(architecture_without_this_size, 2, "'resnet8' does not support 224 px", id="arch-without-224px"),
    pytest.param(unknown_student, 2, "unknown architecture 'resnet9000'", id="unknown-student-arch"),
    # 10. IPC out of range
    pytest.param(recover_ipc_zero, 2, "ipc must be at least 1 (got 0)", id="recover-ipc-0"),
    pytest.param(random_real_ipc("0"), 2, "ipc", id="random-real-ipc-0"),
    pytest.param(random_real_ipc("-3"), 2, "ipc must be at least 1 (got -3)", id="random-real-ipc-negative"),
    pytest.param(
        random_real_ipc("100000"), 2, "training images, fewer than the 100000 needed", id="random-real-ipc-too-large"
    ),
    pytest.param(
        experts_whose_dataset_is_gone("recover"),
        2,
        "the experts' dataset ({tmp}/gone.tar.gz) is not available; give --dataset",
        id="experts-dataset-gone-recover",
    ),
    pytest.param(
        experts_whose_dataset_is_gone("ablate"),
        2,
        "the experts' dataset ({tmp}/gone.tar.gz) is not available; give --dataset",
        id="experts-dataset-gone-ablate",
    ),
    # 11. committee larger than the pool
    pytest.param(committee_larger_than_pool, 2, "committee size 3 is larger than the pool of 2", id="committee-3-of-2"),
    # 12. overrides with an unknown key, a wrong type or unparsable text (presets are chosen by name only)
    pytest.param(with_set("squeeze", "lrr=1"), 2, "unknown key 'lrr'", id="set-unknown-key"),
    pytest.param(
        with_set("squeeze", "batch_size=many"), 2, "batch_size: expected an integer, got 'many'", id="set-wrong-type"
    ),
    pytest.param(with_set("recover", "r_bn=high"), 2, "r_bn: expected a number, got 'high'", id="set-recover-type"),
    pytest.param(with_set("recover", "betas=[0.5]"), 2, "betas: expected 2 values, got 1", id="set-tuple-length"),
    pytest.param(with_set("squeeze", "lr"), 2, "--set expects key=value, got 'lr'", id="set-without-value"),
    pytest.param(with_set("squeeze", "lr=[0.1"), 2, "--set lr: cannot parse '[0.1'", id="set-unparsable"),
    pytest.param(preset_file_path, 2, "unknown squeeze preset '{tmp}/mine.yaml'; choose one of", id="preset-file-path"),
    pytest.param(with_set("squeeze", "lr=1e-3", "weight_decay=5E-4"), 0, "convnet_d3_w32", id="handled-set-1e-3"),
    pytest.param(
        expert_of_another_width,
        2,
        "does not match architecture 'convnet_d3_w64': size mismatch for",
        id="expert-shapes-of-another-arch",
    ),
    pytest.param(truncated_npz, 2, "{tmp}/set.npz is not a cvdd export (.npz with", id="truncated-npz"),
    pytest.param(
        npz_with(np.arange(3), [str(i) for i in range(10)]),
        2,
        "{tmp}/set.npz: labels must be integers (N,) with one per image; got int64 (3,) for 10 images",
        id="npz-fewer-labels",
    ),
    pytest.param(
        npz_with(np.eye(10, dtype=np.int64), [str(i) for i in range(10)]),
        2,
        "labels must be integers (N,)",
        id="npz-one-hot-labels",
    ),
    pytest.param(
        npz_with(np.arange(10) % 3, ["0", "1", "0"]), 2, "a class name is listed twice", id="npz-duplicate-class"
    ),
    pytest.param(
        npz_with(np.arange(10) % 9, [str(i) for i in range(10)]),
        2,
        "{tmp}/set.npz: class '9' has no image",
        id="npz-empty-class",
    ),
    # 13. a tampered checksum, 14. merge of a folder that is not a recover run
    pytest.param(tampered_unit("recover"), 2, "with a checksum mismatch", id="tampered-unit-recover"),
    pytest.param(tampered_unit("merge"), 2, "checksum mismatch", id="tampered-unit-merge"),
    pytest.param(merge_not_a_run, 2, "{tmp}/syn is not a recover run (no recover.json)", id="merge-not-a-run"),
    pytest.param(merge_other_manifest_kind, 2, "is not a cvdd recover-manifest", id="merge-other-kind"),
    pytest.param(merge_truncated_manifest, 2, "unreadable run manifest", id="merge-truncated-manifest"),
    pytest.param(merge_manifest_of_another_shape, 2, "recover.json: no list of units", id="merge-manifest-shape"),
    pytest.param(info_of_metadata_not_utf8, 2, "unreadable metadata {tmp}/syn/synthetic.json", id="info-not-utf8"),
    pytest.param(
        export_of_metadata_that_is_a_list,
        2,
        "unreadable metadata {tmp}/syn/synthetic.json: expected a JSON object, found list",
        id="export-metadata-list",
    ),
    # 17. choices that used to fail late (after a dataset decode or an epoch) or with a traceback
    pytest.param(
        distill_of_a_dataset_without_its_own_preset,
        2,
        "cvdd distill needs --preset for cifar10: it has no preset of its own; `cvdd presets cifar10` lists them",
        id="distill-without-preset",
    ),
    pytest.param(
        distill_of_a_mistyped_folder, 2, "dataset path does not exist: {tmp}/nowhere/imgs", id="distill-missing-folder"
    ),
    pytest.param(relabel_with_unknown_preset, 2, "unknown distill preset 'digitz'", id="relabel-unknown-preset"),
    pytest.param(distill_with_unknown_student, 2, "resnet1B", id="distill-unknown-student"),
    pytest.param(
        lambda c: ["squeeze", "--dataset", str(c.tmp / "nowhere"), "--preset", "cifar1O"],
        2,
        "unknown squeeze preset 'cifar1O'",
        id="squeeze-preset-before-data",
    ),
    pytest.param(
        lambda c: ["squeeze", "--dataset", str(c.tmp / "nowhere"), "--arch", "resnet1B"],
        2,
        "unknown architecture 'resnet1B'",
        id="squeeze-arch-before-data",
    ),
    pytest.param(ablate_with_empty_experts_folder, 2, "no experts found in {tmp}/empty", id="ablate-no-experts"),
    pytest.param(info_of_a_json_list, 2, "{tmp}/synthetic.json is not cvdd metadata", id="info-json-list"),
    pytest.param(bad_tracker, 2, "unknown tracker 'tensorbord'", id="bad-tracker"),
    pytest.param(
        fixed_committee_of_another_size, 2, "has 1 experts but committee_size is 2", id="fixed-committee-size"
    ),
    # 16. malformed --shard
    pytest.param(shard("3/2"), 2, "--shard index must be in 0..COUNT-1 (got '3/2')", id="shard-3-of-2"),
    pytest.param(shard("first"), 2, "--shard takes INDEX/COUNT such as 0/4 (got 'first')", id="shard-not-i-n"),
]


@pytest.mark.parametrize(("build", "status", "text"), CASES)
def test_bad_input(
    build: Callable[[Ctx], list[str]], status: int, text: str, ctx: Ctx, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = build(ctx)
    capsys.readouterr()  # forget what the setup commands printed
    assert main([*argv, "--quiet"]) == status
    out, err = capsys.readouterr()
    expected = text.replace("{tmp}", str(ctx.tmp))
    if status == 0:
        assert expected in out and "error" not in err
        return
    assert err.startswith("cvdd: error: ") and err.count("\n") == 1, err
    assert expected in err, err
