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
