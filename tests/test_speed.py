"""The speed suite (`cvdd bench --suite speed`): a tiny run prints every table and ratio, with equal work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cvdd.cli import main
from cvdd.device import num_threads
from cvdd.errors import ConfigError
from cvdd.speed import SpeedConfig, run_speed_suite, speed_config

TINY = {
    "train_per_class": 4,
    "test_per_class": 2,
    "ipcs": [1, 2],
    "epochs": 1,
    "recover_ipc": 1,
    "recover_iterations": 2,
    "recover_overrides": {"compile": False},  # two iterations: compiling the experts would only cost time
    "recover_reps": 1,
    "recover_warmup": 0,
    "squeeze_repeats": 1,
    "experts": "squeeze",  # hermetic: one-epoch experts squeezed on the slice, not a cached folder
}


@pytest.fixture(scope="module")
def tiny_report(cifar_slice: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("speed")
    cfg = speed_config({**TINY, "data": str(cifar_slice), "work_dir": str(tmp / "work")})
    with num_threads(1):  # tiny batches: one thread is faster, and robust to a busy machine
        return run_speed_suite(cfg, device="cpu", out=tmp / "out" / "speed.md", echo=False)


def test_every_stage_table_and_ratio_is_printed(tiny_report) -> None:
    text = tiny_report.text
    for stage in ("squeeze", "recover", "relabel", "evaluate", "summary"):
        assert f"\n## {stage}" in text, stage
    for ratio in (
        "cvdd / naive images/s: **",
        "cvdd / naive s/image: **",
        "IPC 1: cvdd / naive label epochs/s: **",
        "IPC 2: cvdd / naive label epochs/s: **",
        "IPC 1: cvdd / naive epochs/s: **",
        "IPC 2: cvdd / naive epochs/s: **",
    ):
        assert ratio in text, ratio
    assert "peak RSS MiB" in text and "fwd+bwd share" in text and "teacher forward share" in text
    summary = tiny_report.results["summary"]
    assert [s["stage"] for s in summary] == [
        "squeeze",
        "recover",
        "relabel IPC 1",
        "relabel IPC 2",
        "evaluate IPC 1",
        "evaluate IPC 2",
    ]
    for s in summary:
        assert math.isfinite(s["ratio"]) and s["ratio"] > 0, s
    # the tables are also in the --out file, exactly as printed
    assert tiny_report.path is not None and tiny_report.path.read_text() == text


def test_naive_evaluate_does_the_same_work_as_cvdd(tiny_report) -> None:
    rows = tiny_report.results["evaluate"]
    for ipc in (1, 2):
        c, n = (next(r for r in rows if r["ipc"] == ipc and r["who"] == w) for w in ("cvdd", "naive"))
        assert c["epochs"] == n["epochs"] == 1
        assert c["steps"] == n["steps"] == math.ceil(10 * ipc / 16)  # optimiser steps, counted by a hook
        assert c["micro_batches"] == n["micro_batches"] > 0  # student forwards in training mode
        assert c["images"] == n["images"] == 10 * ipc
        assert 0 < c["share"] <= 1.0 and 0 < n["share"] <= 1.0
    squeeze = tiny_report.results["squeeze"]
    assert squeeze["cvdd"]["images"] == squeeze["naive"]["images"] == 40
    assert squeeze["cvdd"]["steps"] == squeeze["naive"]["steps"]


def test_label_files_one_per_epoch_versus_one_per_batch(tiny_report) -> None:
    for r in tiny_report.results["relabel"]:
        if r["who"] == "cvdd":
            assert r["files"] == 2  # epoch_0000.safetensors + labels.json
        else:
            assert r["files"] == math.ceil(r["images"] / 16)  # one torch.save per batch of 16
        assert r["bytes"] > 0
    recover = tiny_report.results["recover"]
    assert recover["cvdd"]["images"] == recover["naive"]["images"] == 10
    assert recover["naive"]["reloads"] == 2  # the committee of 2 reloaded for the one IPC index


def test_config_errors_and_small_budget() -> None:
    from cvdd.errors import ConfigError

    assert speed_config(budget="small").epochs == 1
    with pytest.raises(ConfigError, match="unknown key"):
        speed_config({"epoch": 3})
    with pytest.raises(ConfigError, match="unknown speed stage"):
        speed_config({"stages": ["distill"]})
    with pytest.raises(ConfigError, match="below the largest IPC"):
        SpeedConfig(train_per_class=5, ipcs=[10]).validate()


def test_cli_speed_suite_writes_its_tables(cifar_slice: Path, tmp_path: Path, capsys) -> None:
    with num_threads(1):
        code = main(
            [
                "bench",
                "--suite",
                "speed",
                "--data",
                str(cifar_slice),
                "--out",
                str(tmp_path / "b"),
                "--device",
                "cpu",
                "--set",
                "stages=[squeeze]",
                "--set",
                "train_per_class=2",
                "--set",
                "squeeze_repeats=1",
                "--set",
                "experts=squeeze",
                "--set",
                f"work_dir={tmp_path / 'work'}",
                "--ipc",
                "1",
                "--quiet",
            ]
        )
    assert code == 0
    text = (tmp_path / "b" / "speed.md").read_text()
    assert "## squeeze" in text and "cvdd / naive images/s" in text and "command: `cvdd bench --suite speed" in text
    assert "tables written to" in capsys.readouterr().out


def test_pipeline_suite_still_needs_data(capsys) -> None:
    assert main(["bench", "--out", "unused"]) == 2
    assert "needs --data" in capsys.readouterr().err
    # The pipeline suite's options are refused by the speed suite rather than silently ignored.
    assert main(["bench", "--suite", "speed", "--methods", "cvdd", "--out", "unused"]) == 2
    assert "--methods and --seeds belong to the pipeline suite" in capsys.readouterr().err


def test_recover_overrides_reach_cvdd_recover(cifar_slice: Path, tmp_path: Path) -> None:
    """recover_overrides reach cvdd's recover: one unit per IPC index, or all indices fused with per-index BN."""
    base = {**TINY, "recover_ipc": 2, "stages": ["recover"], "data": str(cifar_slice)}
    for i, (over, expected) in enumerate(
        (
            ({"ipc_per_block": 1}, "(2 unit(s) of 10 images"),
            ({"ipc_per_block": 2, "bn_groups": "ipc"}, "(1 unit(s) of 20 images"),
        )
    ):
        over = {**TINY["recover_overrides"], **over}
        cfg = speed_config({**base, "recover_overrides": over, "work_dir": str(tmp_path / f"work{i}")})
        with num_threads(1):
            report = run_speed_suite(cfg, device="cpu", out=tmp_path / "speed.md", echo=False)
        text = report.path.read_text()
        assert f"cvdd `recover` {expected}" in text and "naive (one IPC index at a time" in text


def test_relabel_then_evaluate_agree_on_the_teacher_under_bf16(cifar_slice: Path, tmp_path: Path) -> None:
    """The labels the suite stores are the ones its students ask for, also in bf16 (the GPU's default precision:
    on an H200 the evaluate stage once refused the relabel stage's fp32-described labels)."""
    over = {**TINY, "ipcs": [1], "stages": ["evaluate"], "evaluate_overrides": {"precision": "bf16"}}
    cfg = speed_config({**over, "data": str(cifar_slice), "work_dir": str(tmp_path / "work")})
    assert cfg.evaluate_overrides == {"precision": "bf16"}
    with num_threads(1):
        report = run_speed_suite(cfg, device="cpu", out=tmp_path / "speed.md", echo=False)
    assert report.results["evaluate"] and "## evaluate" in report.path.read_text()
    labels = (tmp_path / "work" / "labels-cvdd-ipc1" / "labels.json").read_text()
    assert '"precision": "bf16"' in labels


def test_evaluate_options_the_naive_code_has_fixed_are_refused() -> None:
    with pytest.raises(ConfigError, match="evaluate_overrides label_dtype, topk: the naive reference has these fixed"):
        speed_config({"evaluate_overrides": {"topk": 5, "label_dtype": "fp32", "precision": "fp32"}})
