"""The benchmark scripts a GPU session runs (``bench/gpu_session.sh``) still run: tiny CPU configurations, so that
a broken script is found here rather than in a 15-minute GPU lease."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]


def test_bench_relabel_compares_the_two_relabel_paths() -> None:
    rows = _rows(_run("bench_relabel.py", "--archs", "convnet_d3_w32", "--ipcs", "1", "2", "--reps", "1"))
    assert [r[0] for r in rows[1:]] == ["1", "2"]  # a header, then one row per IPC
    for r in rows[1:]:
        assert float(r[2]) > 0 and float(r[3]) > 0 and float(r[7]) < 1e-4  # both timed, the same logits


@pytest.mark.slow  # two fresh processes: 11 s
def test_bench_ops_counts_operators_with_and_without_bn_matching() -> None:
    rows = _rows(_run("bench_ops.py", "--archs", "resnet8", "--reps", "1", "--batch", "4"))
    plain, hooked = (int(v.replace(",", "")) for v in rows[1][1:3])
    assert rows[1][0] == "resnet8" and hooked > plain > 0


def test_bench_checkpoint_times_the_three_checkpoint_modes() -> None:
    rows = _rows(
        _run("bench_checkpoint.py", "--data", "digits", "--students", "convnet_d3_w32", "--epochs", "2", "--ipc", "1")
    )
    modes = {r[1]: r for r in rows[1:]}
    assert len(modes) == 3 and all(float(r[2]) > 0 for r in rows[1:])
    # Two epochs in well under a minute: the default writes once (after the last), every-epoch twice.
    assert [int(r[4]) for r in modes.values()] == [0, 2, 1]


@pytest.mark.parametrize("part", ["1", "2"])
def test_gpu_session_script_keeps_its_files_under_the_device_tools_limit(part: str, tmp_path: Path) -> None:
    """The session script's shell logic with every command stubbed (no GPU here): it reaches its last step, and a
    part leaves at most 8 files in $OUT (the device tool returns no more), part 2's tables all in one file."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("nvidia-smi", "fakepy"):
        stub = fake_bin / name
        stub.write_text('#!/bin/sh\necho "stub $*"\n')
        stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "PYTHON": "fakepy",
        "OUT": str(out),
        "CVDD_GPU_WORK": str(work),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), part],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "=== " in done.stdout and "done" in done.stdout.splitlines()[-1]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    if part == "2":
        report = (out / "part2.md").read_text()
        assert "speed suite on CUDA" in report and "stub bench/bench_relabel.py" in report
        assert "GPU tests" in report  # part 1 did not run here, so part 2 runs them first
