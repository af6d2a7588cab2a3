"""torchrun (gloo, CPU) against one process: recover and relabel give identical files, evaluate agrees.

Every command runs in its own process with one thread, the way torchrun starts its workers, so the single-process
reference does the same floating-point work as each rank; single-process commands are forked from a server that has
imported cvdd once (``tests/forkserver.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvdd import distributed as dd
from cvdd.distributed import Shard
from cvdd.errors import ConfigError
from forkserver import ForkServer, server_env

pytestmark = pytest.mark.distributed

RECOVER = [
    "--ipc",
    "2",
    "--iterations",
    "4",
    "--init",
    "real",
    "--set",
    "classes_per_block=5",
    "--set",
    "ipc_per_block=1",
]
RECOVER += ["--quiet"]


def _run(args: list[str], nproc: int = 1, server: ForkServer | None = None) -> str:
    """``cvdd ARGS`` under torchrun with ``nproc`` ranks, or as one process (forked from ``server`` when given)."""
    if server is not None and nproc == 1:
        code, output = server.run(args)
        assert code == 0, output[-3000:]
        return output
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            "-m",
            "cvdd",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "cvdd", *args]
    # Own session, so a hung rank is killed with its launcher instead of outliving the test.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(), start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:1])} timed out: {err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def single_recover(digit_experts: Path, tmp_path_factory: pytest.TempPathFactory, fork_server: ForkServer) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run(["recover", "--experts", str(digit_experts), "--out", str(out), *RECOVER], server=fork_server)
    return out


def test_gpu_process_groups_also_carry_cpu_tensors() -> None:
    """cvdd sums counters on the CPU: a GPU group needs gloo for them beside NCCL (plain "nccl" has no CPU backend)."""
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    def devices(backend: str) -> dict[str, str]:
        return BackendConfig(Backend(backend)).get_device_backend_map()

    assert devices(dd.backend_for(use_cuda=True)) == {"cpu": "gloo", "cuda": "nccl"}
    assert "cpu" not in devices("nccl")  # what init_from_env asked for before
    assert devices(dd.backend_for(use_cuda=False))["cpu"] == "gloo"


def test_shard_parse_and_take() -> None:
    s = Shard.parse("1/3")
    assert s.take(list(range(7))) == [1, 4]
    # Shards partition the units: together they take each exactly once.
    parts = [Shard(i, 3).take(list(range(7))) for i in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(7))
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="--shard"):
            Shard.parse(bad)


def test_torchrun_recover_equals_single_process(digit_experts: Path, single_recover: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    _run(["recover", "--experts", str(digit_experts), "--out", str(out), *RECOVER], nproc=2)
    a = _tensors(single_recover / "synthetic.safetensors")
    b = _tensors(out / "synthetic.safetensors")
    assert torch.equal(a["images"], b["images"])
    assert torch.equal(a["labels"], b["labels"])
    assert len(list((out / "units").glob("*.safetensors"))) == 4


def test_job_array_shards_then_merge_equal_single_process(
    digit_experts: Path, single_recover: Path, tmp_path: Path, fork_server: ForkServer
) -> None:
    out = tmp_path / "array"
    shard = ["recover", "--experts", str(digit_experts), "--out", str(out), "--shard"]
    first = _run([*shard, "1/3", *RECOVER], server=fork_server)
    assert "cvdd merge" in first and not (out / "synthetic.safetensors").exists()
    from cvdd.api import info

    described = info(out)
    assert described["kind"] == "recover run (not assembled)" and described["units_done"] == "1 of 4"
    code, printed = fork_server.run(["merge", str(out)])
    assert code == 2 and "units not finished" in printed and printed.count("\n") == 1
    for i in (0, 2):
        _run([*shard, f"{i}/3", *RECOVER], server=fork_server)
    _run(["merge", str(out)], server=fork_server)
    a = _tensors(single_recover / "synthetic.safetensors")
    b = _tensors(out / "synthetic.safetensors")
    assert torch.equal(a["images"], b["images"])


def test_torchrun_relabel_equals_single_process(
    digit_experts: Path, single_recover: Path, tmp_path: Path, fork_server: ForkServer
) -> None:
    common = ["relabel", str(single_recover), "--experts", str(digit_experts), "--set", "epochs=3", "--quiet"]
    _run([*common, "--out", str(tmp_path / "one")], server=fork_server)
    _run([*common, "--out", str(tmp_path / "two")], nproc=2)
    for e in range(3):
        a = _tensors(tmp_path / "one" / f"epoch_{e:04d}.safetensors")
        b = _tensors(tmp_path / "two" / f"epoch_{e:04d}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert '"complete": true' in (tmp_path / "two" / "labels.json").read_text()


def test_torchrun_evaluate_agrees_with_single_process(digit_experts: Path, fork_server: ForkServer) -> None:
    """Data parallel: the same global batches and summed gradients, so accuracy agrees within 1 point.

    Ten real images per class with hard labels: a recovered IPC 2 set taught a hard-label student about chance
    (8-9%) in 8 epochs, where float rounding between the two runs moved the score by more than a point."""
    common = [
        "evaluate",
        "random-real",
        "--ipc",
        "10",
        "--experts",
        str(digit_experts),
        "--epochs",
        "8",
        "--labels",
        "hard",
        "--seeds",
        "0",
        "--quiet",
    ]
    pattern = re.compile(r"top-1 on the real test set: ([0-9.]+)")
    one = float(pattern.search(_run(common, server=fork_server)).group(1))
    two_out = _run(common, nproc=2)
    assert two_out.count("top-1 on the real test set") == 1  # only rank 0 reports
    two = float(pattern.search(two_out).group(1))
    print(f"evaluate top-1: one process {one:.2f}%, torchrun x2 {two:.2f}%")
    assert abs(one - two) <= 1.0, (one, two)


def test_sharded_batch_sampler_covers_each_global_batch_once() -> None:
    from cvdd.data.loader import _ShardedBatchSampler

    one = list(_ShardedBatchSampler(23, 8, True, seed=5, index=0, count=1))
    parts = [list(_ShardedBatchSampler(23, 8, True, seed=5, index=i, count=3)) for i in range(3)]
    assert len(one) == 3 and all(len(p) == 3 for p in parts)
    for step, batch in enumerate(one):
        # The ranks' slices of a step, in rank order, are exactly the single-process batch.
        assert [i for p in parts for i in p[step]] == batch


@pytest.mark.parametrize("n, batch, count", [(37, 16, 5), (36, 16, 5), (20, 16, 16), (1281167 % 128 + 256, 128, 16)])
def test_sharded_slices_are_balanced_never_empty_and_weighted_by_the_global_batch(n, batch, count) -> None:
    from cvdd.data.loader import _ShardedBatchSampler, global_batch_size, sharded_steps
    from cvdd.engine.loop import Batch, _my_micro_batches

    parts = [list(_ShardedBatchSampler(n, batch, True, seed=3, index=i, count=count)) for i in range(count)]
    steps = sharded_steps(n, batch, count)
    assert all(len(p) == steps for p in parts)
    last = n % batch
    # a last batch with fewer images than ranks (ImageNet-1K, batch 128, 16 ranks: 15 images) is left out
    assert steps == -(-n // batch) - (1 if 0 < last < count else 0)
    for step in range(steps):
        sizes = [len(p[step]) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sum(sizes) == global_batch_size(n, batch, step)
        assert len({i for p in parts for i in p[step]}) == sum(sizes)
        # every image weighs 1 / (global batch), whatever the size of its rank's slice
        rows = Batch(torch.zeros(sizes[-1], 1), torch.zeros(sizes[-1], dtype=torch.long))
        micros, total = _my_micro_batches(rows, 0, count - 1, count, global_size=sum(sizes))
        assert total == sum(sizes) and sum(len(m) for m in micros) == sizes[-1]


def test_a_cuda_index_under_a_launcher_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="each rank takes its own GPU"):
        dd.init_from_env("cuda:1")


def test_torchrun_squeeze_trains_one_expert_written_once(tmp_path: Path) -> None:
    out = tmp_path / "experts"
    args = ["squeeze", "--dataset", "digits", "--arch", "convnet_d3_w32", "--epochs", "2", "--out", str(out)]
    printed = _run([*args, "--quiet"], nproc=2)
    meta = json.loads((out / "convnet_d3_w32.json").read_text())
    assert meta["test_acc"] > 0.5 and printed.count("convnet_d3_w32") >= 1
    assert not list(out.glob(".*.tmp*"))


def test_wait_timeout_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("CVDD_WAIT_TIMEOUT_S", raising=False)
    assert dd.wait_timeout().total_seconds() == dd.WAIT_TIMEOUT_S == 7200  # not PyTorch's default 30 minutes
    monkeypatch.setenv("CVDD_WAIT_TIMEOUT_S", "90")
    assert dd.wait_timeout().total_seconds() == 90
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("CVDD_WAIT_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="CVDD_WAIT_TIMEOUT_S"):
            dd.wait_timeout()


def test_a_barrier_waits_up_to_its_timeout_and_a_dead_rank_stops_the_others() -> None:
    """Two ranks started by hand (a launcher other than torchrun: only the standard variables): rank 0 works 4 s
    while rank 1 waits at a barrier allowed 1 s. Rank 1 fails with gloo's timeout, and rank 0, reaching the barrier
    after rank 1 died, fails at once instead of waiting for it."""
    import socket
    import time

    code = (
        "import time\nfrom cvdd import distributed as dd\ndd.init_from_env('cpu')\n"
        "time.sleep(4 if dd.rank() == 0 else 0)\ndd.barrier()\nprint('passed')\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**server_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "CVDD_WAIT_TIMEOUT_S": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    t0 = time.time()
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    waited = time.time() - t0
    assert [r[0] != 0 for r in results] == [True, True] and not any("passed" in r[1] for r in results)
    assert "Timed out" in results[1][2], results[1][2][-2000:]
    assert waited < 60  # no rank waited for a dead peer (PyTorch's default timeout is 30 minutes)
