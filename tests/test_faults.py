"""Fault injection: recover, relabel and squeeze processes SIGKILLed at random points, then restarted.

Each stage is first run uninterrupted; then the same command is started, killed with SIGKILL at a random moment
after it has begun writing finished work (several times in a row), and finally allowed to finish. The result
must be bit-identical to the uninterrupted run, and after every kill each file that looks finished must pass
its checksum (a partial write only ever exists under a temporary name). The commands are real processes,
forked from a server that has imported cvdd once (``tests/forkserver.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvdd.artifacts import verify_checksum
from forkserver import ForkServer

KILLS = 2  # kills per stage, each at a random moment (each costs a command's start: data, experts)


def _finish(fork_server: ForkServer, args: list[str]) -> None:
    code, output = fork_server.run([*args, "--quiet"])
    assert code == 0, output[-3000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the fork server reaps its child at once: a finished child's pid is gone
    except ProcessLookupError:
        return False
    return True


def _kill_midway(fork_server: ForkServer, args: list[str], started: Callable[[], bool], rng: random.Random) -> bool:
    """Start ``args``; once ``started()`` is true wait a random 0-0.6 s and SIGKILL it. False if it finished first."""
    pid, _ = fork_server.start([*args, "--quiet"])
    deadline = time.time() + 120
    while not started() and _alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    with contextlib.suppress(ProcessLookupError):  # it finished first
        os.kill(pid, signal.SIGKILL)
    return fork_server.wait() == -signal.SIGKILL


def _assert_finished_files_valid(folder: Path) -> None:
    """Every unit that has its metadata written verifies against its tensors (no partial file looks finished)."""
    for meta_path in folder.glob("*.json"):
        tensors = meta_path.with_suffix(".safetensors")
        assert tensors.is_file(), f"{meta_path} without its tensors"
        verify_checksum(tensors, json.loads(meta_path.read_text()))


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def test_recover_killed_repeatedly_resumes_to_identical_images(
    fork_server: ForkServer, digit_experts: Path, tmp_path: Path
) -> None:
    args = ["--experts", str(digit_experts), "--ipc", "2", "--iterations", "10", "--init", "real"]
    args += ["--set", "ipc_per_block=1", "--set", "classes_per_block=2"]  # 10 units of 0.1-0.3 s
    _finish(fork_server, ["recover", *args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    cmd = ["recover", *args, "--out", str(out)]
    rng = random.Random(1)
    kills = 0
    for _ in range(KILLS):
        before = len(list((out / "units").glob("*.json")))
        killed = _kill_midway(fork_server, cmd, lambda b=before: len(list((out / "units").glob("*.json"))) > b, rng)
        kills += killed
        _assert_finished_files_valid(out / "units")
        assert not killed or not (out / "synthetic.safetensors").exists()
    _finish(fork_server, cmd)
    print(f"recover: {kills} of {KILLS} kills interrupted the run; result identical")
    assert kills >= 1
    _same_tensors(tmp_path / "ref" / "synthetic.safetensors", out / "synthetic.safetensors")


def test_relabel_killed_repeatedly_resumes_to_identical_labels(
    fork_server: ForkServer, digit_experts: Path, digits, tmp_path: Path
) -> None:
    import cvdd

    syn = tmp_path / "syn"
    cvdd.recover(digit_experts, syn, ipc=10, iterations=2, init="real", dataset=digits, progress=False)
    args = ["relabel", str(syn), "--experts", str(digit_experts), "--set", "epochs=20"]
    _finish(fork_server, [*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    cmd = [*args, "--out", str(out)]
    rng = random.Random(2)
    kills = 0
    for _ in range(KILLS):
        before = len(list(out.glob("epoch_*.safetensors")))
        killed = _kill_midway(fork_server, cmd, lambda b=before: len(list(out.glob("epoch_*.safetensors"))) > b, rng)
        kills += killed
        for shard in out.glob("epoch_*.safetensors"):
            load_file(str(shard))  # a shard under its final name is always complete
        assert not killed or json.loads((out / "labels.json").read_text())["complete"] is False
    _finish(fork_server, cmd)
    print(f"relabel: {kills} of {KILLS} kills interrupted the run")
    assert kills >= 1
    for e in range(20):
        _same_tensors(tmp_path / "ref" / f"epoch_{e:04d}.safetensors", out / f"epoch_{e:04d}.safetensors")
    assert json.loads((out / "labels.json").read_text())["complete"] is True


@pytest.mark.parametrize("arch", ["convnet_d3_w32"])
def test_squeeze_killed_repeatedly_resumes_to_identical_weights(
    fork_server: ForkServer, arch: str, tmp_path: Path
) -> None:
    # A checkpoint after every epoch (~2 s each), not every 60 s as by default.
    args = ["squeeze", "--dataset", "digits", "--arch", arch, "--epochs", "3", "--set", "checkpoint_every_s=0"]
    _finish(fork_server, [*args, "--out", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    cmd = [*args, "--out", str(out)]
    ckpt = out / ".checkpoints" / f"{arch}.pt"
    rng = random.Random(3)
    kills = 0
    for _ in range(KILLS):
        stamp = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        killed = _kill_midway(fork_server, cmd, lambda s=stamp: ckpt.exists() and ckpt.stat().st_mtime_ns != s, rng)
        kills += killed
        assert not killed or not (out / f"{arch}.json").exists()
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # the checkpoint is never a partial write
    _finish(fork_server, cmd)
    print(f"squeeze: {kills} of {KILLS} kills interrupted the run")
    assert kills >= 1
    _same_tensors(tmp_path / "ref" / f"{arch}.safetensors", out / f"{arch}.safetensors")
    # The finished expert says it was resumed, keeps every epoch's history, and its checkpoint is gone.
    meta = json.loads((out / f"{arch}.json").read_text())
    assert meta["resumed_from_epoch"] >= 1 and len(meta["history"]) == 3
    assert not ckpt.exists()
