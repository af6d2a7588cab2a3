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
from cvdd.evaluate.student import EvalConfig, evaluate_synthetic, random_real_set
from cvdd.relabel.bssl import Teacher


def test_recover_bf16_matches_fp32_loss_and_drift(digit_experts: Path, digits, tmp_path: Path) -> None:
    runs = {
        p: cvdd.recover(
            digit_experts,
            tmp_path / p,
            ipc=2,
            iterations=50,
            init="real",
            dataset=digits,
            overrides={"precision": p},
            progress=False,
        )
        for p in ("fp32", "bf16")
    }
    a, b = (runs[p].meta["units"][0] for p in ("fp32", "bf16"))
    # Measured: 0.3392 vs 0.3402 (0.3 %), drift 42.26 vs 42.28 /255.
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


def _recover_pair(digit_experts: Path, digits, tmp_path: Path, over: dict, iterations: int) -> tuple[list, list]:
    """The units of a default run and of a run with ``over``; two units (one per IPC index), so that the BN hooks
    are registered again on already-compiled experts for the second unit."""
    runs = [
        cvdd.recover(
            digit_experts,
            tmp_path / name,
            ipc=2,
            iterations=iterations,
            init="real",
            dataset=digits,
            overrides={"ipc_per_block": 1, **o},
            progress=False,
        )
        for name, o in (("plain", {}), ("switched", over))
    ]
    return runs[0].meta["units"], runs[1].meta["units"]


@pytest.mark.parametrize("switch", ["channels_last", "compile"])
def test_recover_layout_and_compile_match_default(digit_experts: Path, digits, tmp_path: Path, switch: str) -> None:
    """channels_last and torch.compile change only the order of float operations: loss, BN loss and drift agree.

    Measured (50 iterations): loss 0.35841 (default) vs 0.35844 (channels_last) vs 0.35850 (compile), drift
    40.958 vs 40.965 vs 40.966 /255.
    """
    units_a, units_b = _recover_pair(digit_experts, digits, tmp_path, {switch: True}, iterations=50)
    assert len(units_a) == len(units_b) == 2
    for a, b in zip(units_a, units_b):
        ra, rb = a["records"][-1], b["records"][-1]
        assert abs(ra["loss"] - rb["loss"]) <= 0.01 * ra["loss"]
        for key in (k for k in ra if k.startswith("bn/")):  # the hooks saw every BN layer through the switch
            assert abs(ra[key] - rb[key]) <= 0.01 * ra[key], key
        assert abs(a["mean_abs_change"] - b["mean_abs_change"]) <= 0.01 * a["mean_abs_change"]


def test_switches_do_not_change_identities() -> None:
    """Turning a switch on is recorded; leaving it off keeps the identities of runs made before it existed."""
    from cvdd.config import Recipe

    assert "compile" not in Recipe().identity() and Recipe(compile=True).identity()["compile"] is True
    assert "compile" not in EvalConfig().identity() and EvalConfig(compile=True).identity()["compile"] is True
    assert "channels_last" not in EvalConfig().identity()
    assert EvalConfig(channels_last=False).identity()["channels_last"] is False
    assert EvalConfig(compile=True).recipe().compile and EvalConfig(channels_last=True).recipe().channels_last


def test_evaluate_compile_and_channels_last_accuracy_within_tolerance(digits) -> None:
    images, labels = random_real_set(digits, 5, seed=0)
    accs = {}
    for name, over in (("plain", {}), ("compile", {"compile": True}), ("channels_last", {"channels_last": True})):
        cfg = EvalConfig(student="convnet_d3_w32", epochs=10, label_mode="hard", seeds=[0], **over)
        accs[name] = evaluate_synthetic(images, labels, digits.spec, digits.test, cfg).mean
    assert abs(accs["plain"] - accs["compile"]) <= 0.03, accs
    assert abs(accs["plain"] - accs["channels_last"]) <= 0.03, accs
