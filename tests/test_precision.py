"""bf16 autocast against fp32, with the tolerances cvdd promises (pixels, BN statistics and losses stay fp32).

Recover's optimisation is chaotic over many steps (two fp32 runs on different hardware also drift apart pixel
by pixel), so it is compared on what matters: the final loss and how far the pixels moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.api import load_pool
from cvdd.data.augment import Normalize
from cvdd.evaluation.student import EvalConfig, evaluate_synthetic, random_real_set
from cvdd.labels.bssl import Teacher
from cvdd.synthesis.recover import load_synthetic


def test_recover_bf16_matches_fp32_loss_and_drift(digit_experts: Path, digits, tmp_path: Path) -> None:
    runs = {
        p: cvdd.recover(
            digit_experts,
            tmp_path / p,
            ipc=2,
            iterations=25,
            init="real",
            dataset=digits,
            overrides={"precision": p},
            progress=False,
        )
        for p in ("fp32", "bf16")
    }
    a, b = (runs[p].meta["units"][0] for p in ("fp32", "bf16"))
    # Measured (25 iterations, 2026-11-27): loss 9.7254 vs 9.7306 (0.05 %), drift 2.4811 vs 2.4801.
    assert abs(a["records"][-1]["loss"] - b["records"][-1]["loss"]) <= 0.05 * a["records"][-1]["loss"]
    assert abs(a["mean_abs_change"] - b["mean_abs_change"]) <= 0.05 * a["mean_abs_change"]
    assert runs["bf16"].meta["config"]["precision"] == "bf16"


def test_bssl_teacher_bf16_logits_within_tolerance(digit_experts: Path, digits) -> None:
    pool = load_pool(digit_experts)
    teacher = Teacher(pool, [0.5, 0.5], group_size=8)
    x = Normalize(digits.spec)(digits.test.images[:64].float() / 255)
    z32 = teacher(x)
    teacher.precision = "bf16"
    z16 = teacher(x)
    assert z16.dtype == torch.float32
    # Measured: relative difference 0.2 %, every argmax equal.
    assert float((z32 - z16).norm() / z32.norm()) < 0.02
    assert float((z32.argmax(1) == z16.argmax(1)).float().mean()) >= 0.98
    assert "precision" in teacher.describe()  # bf16 labels never pass for fp32 ones


@pytest.mark.parametrize("label_mode", ["online", "hard"])
def test_evaluate_bf16_accuracy_within_tolerance(digit_experts: Path, digits, label_mode: str) -> None:
    images, labels = random_real_set(digits, 5, seed=0)
    pool = load_pool(digit_experts)
    accs = {}
    for p in ("fp32", "bf16"):
        cfg = EvalConfig(student="convnet_d3_w32", epochs=10, label_mode=label_mode, seeds=[0], precision=p)
        teacher = None if label_mode == "hard" else Teacher(pool, [0.5, 0.5])
        accs[p] = evaluate_synthetic(images, labels, digits.spec, digits.test, cfg, teacher=teacher).mean
    assert abs(accs["fp32"] - accs["bf16"]) <= 0.05, accs


def _recover_run(digit_experts: Path, digits, out: Path, over: dict, iterations: int):
    """One random expert per IPC index, IPC 6 in three units of two indices, so that the BN hooks are registered
    again on already-compiled experts for the later units, and an expert sees 0, 10 or 20 rows of a unit depending
    on which indices drew it."""
    return cvdd.recover(
        digit_experts,
        out,
        ipc=6,
        iterations=iterations,
        init="real",
        committee_size=1,
        dataset=digits,
        overrides={"ipc_per_block": 2, "committee": "random", **over},
        progress=False,
    )


def _recover_pair(digit_experts: Path, digits, tmp_path: Path, over: dict, iterations: int) -> tuple[dict, dict]:
    """The metadata of a default run and of a run with ``over`` (:func:`_recover_run`)."""
    plain = _recover_run(digit_experts, digits, tmp_path / "plain", {}, iterations)
    switched = _recover_run(digit_experts, digits, tmp_path / "switched", over, iterations)
    return plain.meta, switched.meta


@pytest.mark.parametrize("switch", ["channels_last", "compile"])
def test_recover_layout_and_compile_match_default(
    digit_experts: Path, digits, tmp_path: Path, switch: str, caplog: pytest.LogCaptureFixture
) -> None:
    """channels_last and torch.compile change only the order of float operations: loss, BN loss and drift agree,
    over units whose experts see different numbers of rows (the graph count per size: the next test)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no graphs or recompilation budget left over from earlier tests
    graphs_before = counters["stats"]["unique_graphs"]
    meta_a, meta_b = _recover_pair(digit_experts, digits, tmp_path, {switch: True}, iterations=30)
    units_a, units_b = meta_a["units"], meta_b["units"]
    assert len(units_a) == len(units_b) == 3
    for a, b in zip(units_a, units_b):
        ra, rb = a["records"][-1], b["records"][-1]
        assert abs(ra["loss"] - rb["loss"]) <= 0.01 * ra["loss"]
        for key in (k for k in ra if k.startswith("bn/")):  # the hooks saw every BN layer through the switch
            assert abs(ra[key] - rb[key]) <= 0.01 * ra[key], key
        assert abs(a["mean_abs_change"] - b["mean_abs_change"]) <= 0.01 * a["mean_abs_change"]
    if switch == "compile":
        # The plan gives the experts different row counts across units (else the test would prove nothing).
        committees, pool = meta_b["committees"], meta_b["pool"]
        # IPC indices (10 rows each) of each unit that drew expert e, over the units that use e at all.
        sizes = {e: {n for u in range(3) if (n := sum(c == [e] for c in committees[2 * u : 2 * u + 2]))} for e in pool}
        assert any(len(s) > 1 for s in sizes.values()), sizes
        # The experts really ran compiled (no fallback to their plain forward): at least one graph each, at most
        # two (PyTorch's CPU convolution guards on batches below 16 images, so 10 and 20 rows need one each).
        assert "torch.compile failed" not in caplog.text
        assert len(pool) <= counters["stats"]["unique_graphs"] - graphs_before <= 2 * len(pool)
        # Compiled runs are reproducible too: the same seed gives the same pixels.
        again = _recover_run(digit_experts, digits, tmp_path / "again", {switch: True}, iterations=30)
        assert torch.equal(again.images, load_synthetic(tmp_path / "switched", digits.spec)[0])


def _compiled_committee(arch: str = "convnet_d3_w32"):
    from cvdd.models.registry import create_model
    from cvdd.synthesis.recover import _Committee

    torch._dynamo.reset()
    torch.manual_seed(0)
    return _Committee({"a": create_model(arch, 10, 32)}, torch.device("cpu"), compile=True)


def test_compiled_expert_is_one_graph_for_every_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    """Recover's units give an expert 70, 60, 80, ... rows; a graph with a static batch would be compiled again
    for each (and past dynamo's limit of 8 per forward the expert would silently run eager). One graph serves all,
    and its BN statistics are right for each size."""
    from torch._dynamo.utils import counters

    from cvdd.synthesis.bn_matching import BNMatching

    committee = _compiled_committee()
    before = counters["stats"]["unique_graphs"]
    for n in (20, 30, 40, 70):
        x = torch.randn(n, 3, 32, 32)
        with BNMatching(committee.models["a"]) as bn:
            committee.forward("a", x)
            compiled = float(bn.loss())
        with BNMatching(committee.models["a"]) as bn:
            committee.models["a"](x)
            assert compiled == pytest.approx(float(bn.loss()), rel=1e-4)
    assert counters["stats"]["unique_graphs"] - before == 1
    assert "torch.compile failed" not in caplog.text


# Slow: with an empty compilation cache (a new machine) it took 78 s on the 2-core CPU, 8 s with a warm one.
# Compiled experts with per-index BN groups are no default (the GPU presets that use bn_groups: ipc run eager).
@pytest.mark.slow
def test_compiled_bn_groups_ipc_with_an_uneven_last_unit(
    digit_experts: Path, digits, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Per-index BN statistics (bn_groups: ipc) split the batch into as many groups as the unit has IPC indices; a
    compiled graph traced for units of 2 indices must not be reused for the last unit of 1."""
    runs = [
        cvdd.recover(
            digit_experts,
            tmp_path / str(c),
            ipc=3,
            iterations=10,
            init="real",
            dataset=digits,
            overrides={"ipc_per_block": 2, "bn_groups": "ipc", "compile": c},
            progress=False,
        )
        for c in (False, True)
    ]
    units = [r.meta["units"] for r in runs]
    assert [u["unit"].split("_")[0] for u in units[1]] == ["ipc0000-0001", "ipc0002-0002"]  # 2 indices, then 1
    for a, b in zip(*units):
        for key in (k for k in a["records"][-1] if k == "loss" or k.startswith("bn/")):
            assert a["records"][-1][key] == pytest.approx(b["records"][-1][key], rel=1e-3), key
    assert "torch.compile failed" not in caplog.text


def test_switches_do_not_change_identities() -> None:
    """Turning a switch on is recorded; leaving it off keeps the identities of runs made before it existed."""
    from cvdd.config import Recipe

    assert "compile" not in Recipe().identity() and Recipe(compile=True).identity()["compile"] is True
    assert "compile" not in EvalConfig().identity() and EvalConfig(compile=True).identity()["compile"] is True
    assert "channels_last" not in EvalConfig().identity()
    assert EvalConfig(channels_last=False).identity()["channels_last"] is False
    assert EvalConfig(compile=True).recipe().compile and EvalConfig(channels_last=True).recipe().channels_last


@pytest.mark.parametrize(
    "switch",
    [
        "channels_last",
        # Slow: a cold compilation cache (a new machine) made this test take 42 s on the 2-core CPU; compiled
        # students are opt-in (1.16x slower on an H200, docs/benchmarks/gpu-h200.md).
        pytest.param("compile", marks=pytest.mark.slow),
    ],
)
def test_evaluate_compile_and_channels_last_accuracy_within_tolerance(digits, switch: str) -> None:
    images, labels = random_real_set(digits, 5, seed=0)
    accs = {}
    for name, over in (("plain", {}), (switch, {switch: True})):
        cfg = EvalConfig(student="convnet_d3_w32", epochs=10, label_mode="hard", seeds=[0], **over)
        accs[name] = evaluate_synthetic(images, labels, digits.spec, digits.test, cfg).mean
    assert abs(accs["plain"] - accs[switch]) <= 0.03, accs


def test_compiled_expert_keeps_its_bn_hooks_after_an_unhooked_forward() -> None:
    """The BN hooks of a compiled expert fire in every hooked forward, also after a forward without them.

    Dynamo reuses a graph compiled without hooks once hooks are registered again (their statistics stay empty),
    so the committee runs unhooked forwards uncompiled; the speed suite's benchmark does hooked, unhooked, hooked.
    """
    from cvdd.synthesis.bn_matching import BNMatching

    committee = _compiled_committee()
    x = torch.randn(20, 3, 32, 32)
    losses = []
    for hooked in (True, False, True):
        if not hooked:
            committee.forward("a", x, bn_hooks=False)
            continue
        with BNMatching(committee.models["a"]) as bn:
            committee.forward("a", x)
            losses.append(float(bn.loss()))  # raises if a BN layer's hook did not fire
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_expert_that_cannot_be_compiled_runs_uncompiled(caplog: pytest.LogCaptureFixture) -> None:
    """A preset that compiles (cifar10-cpu) still runs where compilation fails (no C++ compiler, ...): the expert
    falls back to its plain forward with a warning, and its BN hooks still fire."""
    from cvdd.synthesis.bn_matching import BNMatching

    committee = _compiled_committee()

    def broken(x: torch.Tensor) -> torch.Tensor:
        from torch._inductor.exc import InductorError

        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)

    committee._calls["a"] = broken  # what a compiled wrapper does on a machine without a compiler
    x = torch.randn(12, 3, 32, 32)
    with BNMatching(committee.models["a"]) as bn:
        out = committee.forward("a", x)
        loss = bn.loss()
    assert torch.equal(out, committee.models["a"](x)) and float(loss) > 0
    assert "torch.compile failed for expert a (" in caplog.text and "InvalidCxxCompiler" in caplog.text
    committee.forward("a", x)  # later calls go straight to the plain forward, without a second warning
    assert caplog.text.count("torch.compile failed") == 1

    def bad_input(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("a batch of 12 images does not split into 5 equal groups")

    other = _compiled_committee()
    other._calls["a"] = bad_input  # an error that is not the compiler's propagates as it is
    with pytest.raises(ValueError, match="equal groups"):
        other.forward("a", x)
    assert caplog.text.count("torch.compile failed") == 1
