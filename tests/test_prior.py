from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.ablation import carve_validation
from cvdd.api import load_pool
from cvdd.cli import main
from cvdd.errors import ConfigError
from cvdd.synthesis.recover import load_synthetic


def test_prior_is_measured_on_training_images_and_used_by_recover(digit_experts: Path, digits, tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    shutil.copytree(digit_experts, experts)  # prior writes metadata: work on a private copy
    priors = cvdd.prior(
        experts,
        dataset=digits,
        overrides={"epochs": 2, "seeds": [0]},
        recover_overrides={"iterations": 3, "init_candidates": 20, "init_crops": 2},
        val_per_class=20,
        progress=False,
        out=tmp_path / "work",
    )
    assert set(priors) == {"convnet_d3_w32", "resnet8"}
    for name, value in priors.items():
        meta = json.loads((experts / f"{name}.json").read_text())
        assert meta["prior"] == pytest.approx(value) and 0.0 <= value <= 100.0
        assert meta["prior_recipe"]["validation"] == "20 real training images per class, carved out of the init pool"
    # Each expert's set started from the pool without the scoring images (leakage otherwise).
    alone = tmp_path / "alone"
    alone.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(experts / f"resnet8{suffix}", alone / f"resnet8{suffix}")
    again = cvdd.recover(
        alone,
        tmp_path / "again",
        dataset=carve_validation(digits, 20, 0),
        ipc=1,
        committee_size=1,
        overrides={"iterations": 3, "init_candidates": 20, "init_crops": 2},
        progress=False,
    )
    made, _, _ = load_synthetic(tmp_path / "work" / "resnet8")
    assert torch.equal(made, again.images)
    pool = load_pool(experts)
    assert all(e.prior == (priors[e.name], "prior") for e in pool)
    res = cvdd.recover(
        experts, tmp_path / "syn", dataset=digits, ipc=1, progress=False, overrides={"iterations": 2, "init": "real"}
    )
    assert res.meta["prior_sources"] == {"convnet_d3_w32": "prior", "resnet8": "prior"}
    assert res.meta["priors"] == pytest.approx(priors)


def test_prior_cli_takes_recover_and_evaluate_settings(
    digit_experts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experts = tmp_path / "experts"
    shutil.copytree(digit_experts, experts)
    base = ["prior", "--experts", str(experts), "--val-per-class", "20", "--quiet"]
    assert main([*base, "--set", "squeeze.epochs=1"]) == 2
    assert "--set squeeze.epochs: prior trains no experts" in capsys.readouterr().err
    with pytest.raises(
        ConfigError, match="prior recover option 'committee_size': prior sets it itself, from the method"
    ):
        cvdd.prior(experts, recover_overrides={"committee_size": 2}, progress=False)
    settings = ["--set", "epochs=2", "--set", "seeds=[0]", "--set", "recover.iterations=3"]
    # stored soft labels (the cifar10-cpu and paper recipes) need a label folder per expert: this crashed once
    settings += ["--set", "label_mode=stored"]
    recover = ["--set", "recover.init_candidates=20", "--set", "recover.init_crops=2"]
    assert main([*base, *settings, *recover, "--out", str(tmp_path / "work")]) == 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["convnet_d3_w32", "resnet8"]
    for name in ("convnet_d3_w32", "resnet8"):
        labels = json.loads((tmp_path / "work" / name / "labels" / "labels.json").read_text())
        assert "[0.5, 0.5]" in json.dumps(labels)  # the committee teacher of the measurement weighs equally
    printed = capsys.readouterr().out
    for name in ("convnet_d3_w32", "resnet8"):
        meta = json.loads((experts / f"{name}.json").read_text())
        assert f"{name:<18} prior {meta['prior']:.2f}%" in printed
        assert meta["prior_recipe"]["validation"] == "20 real training images per class, carved out of the init pool"
        assert meta["prior_recipe"]["recover_overrides"] == {"iterations": 3, "init_candidates": 20, "init_crops": 2}


def test_bench_cli_small_budget_writes_a_report(cifar_slice: Path, tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    cvdd.squeeze(
        cifar_slice, archs=["convnet_d3_w32", "resnet8"], out=experts, preset="cifar10-cpu", epochs=1, progress=False
    )
    code = main(
        [
            "bench",
            "--data",
            str(cifar_slice),
            "--out",
            str(tmp_path / "b"),
            "--budget",
            "small",
            "--experts",
            str(experts),
            "--ipc",
            "1",
            "--set",
            "epochs=1",
            "--set",
            "student=convnet_d3_w32",
            "--set",
            "recover.iterations=5",  # stage-scoped settings go on top of the small budget
            "--set",
            "recover.compile=false",
            "--methods",
            "random-real",
            "cvdd",
            "--quiet",
        ]
    )
    assert code == 0
    report = (tmp_path / "b" / "bench.md").read_text()
    assert "Machine:" in report and "| cvdd | 1 |" in report and "Command: `cvdd bench" in report
    assert "| sre2l++ |" not in report
    assert "Small budget and --set: squeeze -, recover {'iterations': 5, 'compile': False}, evaluate {" in report
    synthetic = json.loads((tmp_path / "b" / "cvdd" / "ipc1" / "synthetic.json").read_text())
    assert synthetic["config"]["iterations"] == 5 and synthetic["config"]["compile"] is False
