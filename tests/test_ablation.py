"""cvdd ablate: validation carve, grid loading, a tiny real run, and the test split touched only by --final."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvdd.ablation import carve_validation, load_grid, with_baselines
from cvdd.cli import main
from cvdd.errors import ConfigError

GRID = """
random-real: {method: random-real, evaluate: {epochs: 2, label_mode: online}}
sre2l++: {method: sre2l++, recover: {iterations: 2, init: real}, evaluate: {epochs: 2, label_mode: online}}
cvdd-real: {method: cvdd, recover: {iterations: 2, init: real, lr: 0.05}, evaluate: {epochs: 2, label_mode: online}}
cvdd-real-resnet8: {set: cvdd-real, evaluate: {teacher: resnet8}}
"""


def test_carve_validation_is_disjoint_balanced_and_seeded(digits) -> None:
    a = carve_validation(digits, 20, seed=0)
    b = carve_validation(digits, 20, seed=0)
    assert torch.equal(a.test.images, b.test.images)
    assert len(a.test) == 20 * digits.spec.num_classes
    assert torch.bincount(a.test.labels).tolist() == [20] * digits.spec.num_classes
    assert len(a.train) + len(a.test) == len(digits.train)
    # Its own fingerprint per carve: recover keys its units on the pool it initialises from.
    assert a.fingerprint == b.fingerprint != digits.fingerprint
    assert (
        carve_validation(digits, 30, seed=0).fingerprint != a.fingerprint != carve_validation(digits, 20, 1).fingerprint
    )
    # No validation image remains in the pool that initialisation and random real draw from.
    train_rows = {bytes(x.numpy().tobytes()) for x in a.train.images}
    assert not any(bytes(x.numpy().tobytes()) in train_rows for x in a.test.images[:50])


def test_a_selection_keeps_the_random_real_rows_it_is_compared_with() -> None:
    grid = load_grid("cifar10-cpu")
    kept = [c.name for c in with_baselines(grid, ["cvdd-real-lr0.01-teacher-d4"])]
    # The d4-teacher row's gain is taken against random real images labelled by the same teacher.
    assert kept == ["random-real", "random-real-teacher-d4", "cvdd-real-lr0.01-teacher-d4"]
    assert [c.name for c in with_baselines(grid, ["cvdd"])] == ["random-real", "cvdd"]


def test_grids_load_and_reject_bad_entries(tmp_path: Path) -> None:
    names = [c.name for c in load_grid("cifar10-cpu")]
    assert {"random-real", "sre2l++", "cvdd"} <= set(names)
    bad = tmp_path / "bad.yaml"
    bad.write_text("x: {method: cvdd, recovr: {lr: 1}}\n")
    with pytest.raises(ConfigError, match="unknown key 'recovr'"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="unknown grid 'nope'"):
        load_grid("nope")
    bad.write_text("a: {method: cvdd}\nb: {set: c}\n")
    with pytest.raises(ConfigError, match="set 'c' is not a configuration"):
        load_grid(bad)
    bad.write_text("a: {method: cvdd}\nb: {set: a, recover: {lr: 1}}\n")
    with pytest.raises(ConfigError, match="takes no method or recover"):
        load_grid(bad)
    bad.write_text("a: {method: sre2l++, recover: {lr: 0.5}}\nb: {set: a, evaluate: {bssl: false}}\n")
    b = load_grid(bad)[1]
    assert (b.method, b.recover, b.evaluate, b.set_name) == ("sre2l++", {"lr": 0.5}, {"bssl": False}, "a")
    bad.write_text("a: {method: cvdd, evaluate: {epochs: 3, bssl: true}}\nb: {set: a, evaluate: {bssl: false}}\n")
    assert load_grid(bad)[1].evaluate == {"epochs": 3, "bssl": False}


def test_ablate_validation_then_final(digit_experts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "abl"
    # No --dataset and no --preset: the experts' dataset (digits) and its preset.
    common = ["ablate", "--experts", str(digit_experts), "--grid", str(grid), "--ipc", "2"]
    common += ["--seeds", "0", "1", "--val-per-class", "20", "--out", str(out), "--quiet"]
    assert main(common) == 0
    table = capsys.readouterr().out
    assert "validation split" in table and "gain vs random real" in table
    written = json.loads((out / "ablation-validation.json").read_text())
    assert written["header"]["preset"] == "digits"
    rows = written["rows"]
    assert [r["name"] for r in rows] == ["random-real", "sre2l++", "cvdd-real", "cvdd-real-resnet8"]
    assert all(len(r["acc"]) == 2 and r["split"] == "validation" for r in rows)
    # The teacher variant evaluated cvdd-real's very images with another teacher: no set of its own.
    assert rows[3]["set"] == "cvdd-real" and not (out / "sets" / "cvdd-real-resnet8").exists()
    assert rows[3]["evaluate"] == {"epochs": 2, "label_mode": "online", "teacher": "resnet8"}  # merged
    assert rows[3]["random_real_reference"] == "random-real"
    assert rows[3]["within_class_correlation"] == rows[2]["within_class_correlation"]
    assert rows[3]["pixel_change_255"] == rows[2]["pixel_change_255"]
    assert rows[0]["gain_over_random_real"] == 0.0
    assert not (out / "ablation-test.json").exists()  # the test split is untouched so far
    assert main([*common, "--final", "cvdd-real"]) == 0
    final = json.loads((out / "ablation-test.json").read_text())["rows"]
    assert [r["name"] for r in final] == ["random-real", "cvdd-real"] and final[1]["split"] == "test"
    assert main([*common, "--final", "sre2l++"]) == 0  # a second look: the first stays on record
    looks = [json.loads(line) for line in (out / "test-split-looks.jsonl").read_text().splitlines()]
    assert [sorted(look["rows"]) for look in looks] == [["cvdd-real", "random-real"], ["random-real", "sre2l++"]]
    assert main([*common, "--final", "nope"]) == 2
