"""Fault injection: recover, relabel and squeeze processes SIGKILLed at random points, then restarted.

Each stage is first run uninterrupted; then the same command is started, killed with SIGKILL at a random moment
after it has begun writing finished work (several times in a row), and finally allowed to finish. The result
must be bit-identical to the uninterrupted run, and after every kill each file that looks finished must pass
its checksum (a partial write only ever exists under a temporary name).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvdd.artifacts import verify_checksum

KILLS = 2  # kills per stage, each at a random moment (each costs a process start, about 6 s on a 2 GHz core)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _finish(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_midway(cmd: list[str], started: Callable[[], bool], rng: random.Random) -> bool:
    """Start ``cmd``; once ``started()`` is true wait a random 0-0.6 s and SIGKILL it. False if it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not finished


def _assert_finished_files_valid(folder: Path) -> None:
    """Every unit that has its metadata written verifies against its tensors (no partial file looks finished)."""
    for meta_path in folder.glob("*.json"):
        tensors = meta_path.with_suffix(".safetensors")
        assert tensors.is_file(), f"{meta_path} without its tensors"
        verify_checksum(tensors, json.loads(meta_path.read_text()))


def _cvdd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cvdd", *args, "--quiet"]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def test_recover_killed_repeatedly_resumes_to_identical_images(digit_experts: Path, tmp_path: Path) -> None:
    args = ["--experts", str(digit_experts), "--ipc", "3", "--iterations", "20", "--init", "real"]
    args += ["--set", "ipc_per_block=1", "--set", "classes_per_block=2"]  # 15 units of 0.2-0.6 s
    _finish(_cvdd("recover", *args, "--out", str(tmp_path / "ref")))
    out = tmp_path / "killed"
    cmd = _cvdd("recover", *args, "--out", str(out))
    rng = random.Random(1)
    kills = 0
    for _ in range(KILLS):
        before = len(list((out / "units").glob("*.json")))
        killed = _kill_midway(cmd, lambda b=before: len(list((out / "units").glob("*.json"))) > b, rng)
        kills += killed
        _assert_finished_files_valid(out / "units")
        assert not killed or not (out / "synthetic.safetensors").exists()
    _finish(cmd)
    print(f"recover: {kills} of {KILLS} kills interrupted the run; result identical")
    assert kills >= 1
    _same_tensors(tmp_path / "ref" / "synthetic.safetensors", out / "synthetic.safetensors")


def test_relabel_killed_repeatedly_resumes_to_identical_labels(digit_experts: Path, digits, tmp_path: Path) -> None:
    import cvdd

    syn = tmp_path / "syn"
    cvdd.recover(digit_experts, syn, ipc=10, iterations=2, init="real", dataset=digits, progress=False)
    args = ["relabel", str(syn), "--experts", str(digit_experts), "--set", "epochs=40"]
    _finish(_cvdd(*args, "--out", str(tmp_path / "ref")))
    out = tmp_path / "killed"
    cmd = _cvdd(*args, "--out", str(out))
    rng = random.Random(2)
    kills = 0
    for _ in range(KILLS):
        before = len(list(out.glob("epoch_*.safetensors")))
        killed = _kill_midway(cmd, lambda b=before: len(list(out.glob("epoch_*.safetensors"))) > b, rng)
        kills += killed
        for shard in out.glob("epoch_*.safetensors"):
            load_file(str(shard))  # a shard under its final name is always complete
        assert not killed or json.loads((out / "labels.json").read_text())["complete"] is False
    _finish(cmd)
    print(f"relabel: {kills} of {KILLS} kills interrupted the run")
    assert kills >= 1
    for e in range(40):
        _same_tensors(tmp_path / "ref" / f"epoch_{e:04d}.safetensors", out / f"epoch_{e:04d}.safetensors")
    assert json.loads((out / "labels.json").read_text())["complete"] is True


@pytest.mark.parametrize("arch", ["convnet_d3_w32"])
def test_squeeze_killed_repeatedly_resumes_to_identical_weights(arch: str, tmp_path: Path) -> None:
    args = ["squeeze", "--dataset", "digits", "--arch", arch, "--epochs", "4"]  # a checkpoint per epoch, ~2 s each
    _finish(_cvdd(*args, "--out", str(tmp_path / "ref")))
    out = tmp_path / "killed"
    cmd = _cvdd(*args, "--out", str(out))
    ckpt = out / ".checkpoints" / f"{arch}.pt"
    rng = random.Random(3)
    kills = 0
    for _ in range(KILLS):
        stamp = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        killed = _kill_midway(cmd, lambda s=stamp: ckpt.exists() and ckpt.stat().st_mtime_ns != s, rng)
        kills += killed
        assert not killed or not (out / f"{arch}.json").exists()
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # the checkpoint is never a partial write
    _finish(cmd)
    print(f"squeeze: {kills} of {KILLS} kills interrupted the run")
    assert kills >= 1
    _same_tensors(tmp_path / "ref" / f"{arch}.safetensors", out / f"{arch}.safetensors")
    # The finished expert says it was resumed, keeps every epoch's history, and its checkpoint is gone.
    meta = json.loads((out / f"{arch}.json").read_text())
    assert meta["resumed_from_epoch"] >= 1 and len(meta["history"]) == 4
    assert not ckpt.exists()
