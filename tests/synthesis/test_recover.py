"""End-to-end recover on a tiny committee squeezed on real data (digits and a CIFAR-10 slice)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cvdd
from cvdd.ablation import carve_validation
from cvdd.artifacts import build_stamp
from cvdd.cli import main
from cvdd.errors import ArtifactError, ConfigError
from cvdd.experts import list_experts, load_expert
from cvdd.synthesis.recover import RecoverConfig, config_hash, load_synthetic, plan_committees

TINY = {"iterations": 12, "log_every": 4, "init_candidates": 20, "init_crops": 2}


def _recover(experts: Path, out: Path, digits, **kw):
    overrides = {**TINY, **kw.pop("overrides", {})}
    return cvdd.recover(experts, out, dataset=digits, overrides=overrides, progress=False, **kw)


def test_cvdd_n2_and_sre2l_n1_run_on_digits(digit_experts: Path, digits, tmp_path: Path) -> None:
    res = _recover(digit_experts, tmp_path / "cvdd", digits, ipc=3, committee_size=2)
    assert res.images.shape == (30, 3, 32, 32) and res.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
    assert res.meta["method"] == "cvdd" and res.meta["committees"][0] == ["convnet_d3_w32", "resnet8"]
    assert sum(res.meta["weights"][0]) == pytest.approx(1.0)
    # no measured prior: the training accuracy of the experts' last squeeze epoch, never their test accuracy
    assert res.meta["prior_sources"] == {"convnet_d3_w32": "train_acc", "resnet8": "train_acc"}
    metas = {n: json.loads((digit_experts / f"{n}.json").read_text()) for n in res.meta["priors"]}
    assert res.meta["priors"] == pytest.approx({n: 100.0 * m["train_acc"] for n, m in metas.items()})
    assert (tmp_path / "cvdd" / "grid.png").is_file()
    images, labels, _ = load_synthetic(tmp_path / "cvdd", digits.spec)
    assert torch.equal(images, res.images) and torch.equal(labels, res.labels)

    single = _recover(digit_experts, tmp_path / "sre2l", digits, ipc=2, committee_size=1)
    assert single.meta["method"] == "sre2l++" and single.meta["committee_policy"] == "single"
    assert all(len(c) == 1 for c in single.meta["committees"])


def test_initial_images_are_kept_on_disk_until_the_set_is_assembled(
    digit_experts: Path, digits, tmp_path: Path, monkeypatch
) -> None:
    """Units revisit each class once per IPC block: its initial images are made once, read back from disk (a
    resumed run too), give the same set as a run that never stopped, and are removed with the finished set."""
    import cvdd.synthesis.recover as rec

    kw = {"ipc": 3, "overrides": {"ipc_per_block": 1, "classes_per_block": 5, "init": "patches"}}  # 3 visits a class
    whole = _recover(digit_experts, tmp_path / "whole", digits, seed=2, **kw)
    assert not (tmp_path / "whole" / rec.INIT_DIR).exists()
    made: list[int] = []
    real_patch_init = rec.patch_init
    monkeypatch.setattr(rec, "patch_init", lambda data, c, *a, **k: made.append(c) or real_patch_init(data, c, *a, **k))
    real_optimise = rec._optimise_unit
    calls = {"n": 0}

    def killed_after_two_units(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run is killed in its third unit (the second block of classes, IPC 1)
        return real_optimise(*a, **k)

    monkeypatch.setattr(rec, "_optimise_unit", killed_after_two_units)
    with pytest.raises(KeyboardInterrupt):
        _recover(digit_experts, tmp_path / "b", digits, seed=2, **kw)
    assert sorted(made) == list(range(10))  # each class scored once, though IPC 1 of classes 0-4 was read again
    files = sorted(p.name for p in (tmp_path / "b" / rec.INIT_DIR).glob("*/class_*.npy"))
    assert files == [f"class_{c:05d}.npy" for c in range(10)]
    monkeypatch.setattr(rec, "_optimise_unit", real_optimise)
    made.clear()
    resumed = _recover(digit_experts, tmp_path / "b", digits, seed=2, **kw)
    assert made == [] and resumed.units_run == 4  # the resumed run reads the initial images back
    assert torch.equal(resumed.images, whole.images)
    assert not (tmp_path / "b" / rec.INIT_DIR).exists()


def test_same_seed_same_images_and_resume_equals_uninterrupted(
    digit_experts: Path, digits, tmp_path: Path, monkeypatch, caplog
) -> None:
    kw = {"ipc": 3, "overrides": {"ipc_per_block": 1, "classes_per_block": 5, "init": "real"}}
    a = _recover(digit_experts, tmp_path / "a", digits, seed=5, **kw)
    b = _recover(digit_experts, tmp_path / "b", digits, seed=5, **kw)
    assert torch.equal(a.images, b.images)
    c = _recover(digit_experts, tmp_path / "c", digits, seed=6, **kw)
    assert not torch.equal(a.images, c.images)

    # A run "killed" after some units: drop two finished units and the assembled set, then run again.
    units = sorted((tmp_path / "b" / "units").glob("*.safetensors"))
    assert len(units) == 6
    for u in units[2:4]:
        u.unlink()
        u.with_suffix(".json").unlink()
    (tmp_path / "b" / "synthetic.json").unlink()
    assert b.meta["unit_builds"] == [build_stamp()]
    # Resumed by another build of cvdd (another source hash): the finished units are kept, and the log and the
    # set's metadata say which builds made it.
    monkeypatch.setattr("cvdd.artifacts._source_fingerprint", lambda: "newer0source")
    resumed = _recover(digit_experts, tmp_path / "b", digits, seed=5, **kw)
    assert resumed.units_run == 2 and torch.equal(resumed.images, a.images)
    assert f"4 of 4 finished recover units in {tmp_path / 'b'} were made by cvdd" in caplog.text
    assert sorted(b["source"] for b in resumed.meta["unit_builds"]) == sorted(
        [b.meta["build"]["source"], "newer0source"]
    )
    assert [u["build"]["source"] for u in resumed.meta["units"]].count("newer0source") == 2

    with pytest.raises(ArtifactError, match="another configuration"):
        _recover(digit_experts, tmp_path / "b", digits, seed=7, **kw)
    redone = _recover(digit_experts, tmp_path / "b", digits, seed=7, restart=True, **kw)
    assert redone.units_run == 6


def test_units_are_keyed_on_the_real_images_they_start_from(digit_experts: Path, digits, tmp_path: Path) -> None:
    """A set initialised from the whole training set is not reused for a validation carve's pool (leakage)."""
    experts = [load_expert(p) for p in list_experts(digit_experts)]
    cfg = RecoverConfig(ipc=1, init="real").validate(len(experts))
    plan = plan_committees(experts, cfg, 0)
    carved = carve_validation(digits, 20)
    plain = config_hash(cfg, plan, digits.spec, 0, experts)
    # From the experts' own training set the hash is the one of runs made before the pool was hashed (resume).
    assert config_hash(cfg, plan, digits.spec, 0, experts, digits.fingerprint) == plain
    assert config_hash(cfg, plan, digits.spec, 0, experts, carved.fingerprint) != plain
    gauss = RecoverConfig(ipc=1, init="gaussian").validate(len(experts))
    assert config_hash(gauss, plan, digits.spec, 0, experts, carved.fingerprint) == config_hash(
        gauss, plan, digits.spec, 0, experts
    )
    # The expert named for SRe2L++ (`single`) is no part of a committee's hash (it shapes nothing there).
    pair = RecoverConfig(ipc=1, committee_size=2).validate(len(experts))
    named = RecoverConfig(ipc=1, committee_size=2, single="resnet8").validate(len(experts))
    pair_plan = plan_committees(experts, pair, 0)
    assert config_hash(named, pair_plan, digits.spec, 0, experts) == config_hash(
        pair, pair_plan, digits.spec, 0, experts
    )
    alone = RecoverConfig(ipc=1, committee_size=1, single="resnet8").validate(len(experts))
    alone_plan = plan_committees(experts, alone, 0)
    assert config_hash(alone, alone_plan, digits.spec, 0, experts) != config_hash(
        RecoverConfig(ipc=1, committee_size=1, single="convnet_d3_w32").validate(len(experts)),
        alone_plan,
        digits.spec,
        0,
        experts,
    )
    kw = {"ipc": 1, "committee_size": 1, "overrides": {"init": "real", "iterations": 2}}
    _recover(digit_experts, tmp_path / "set", digits, **kw)
    with pytest.raises(ArtifactError, match="another configuration"):
        _recover(digit_experts, tmp_path / "set", carved, **kw)


def test_loss_falls_and_experts_stay_frozen(digit_experts: Path, digits, tmp_path: Path) -> None:
    paths = list_experts(digit_experts)
    before = {p.stem: {k: v.clone() for k, v in load_expert(p).model.state_dict().items()} for p in paths}
    # Without random crops and jitter the objective is (nearly) fixed, so its decrease is visible.
    res = _recover(
        digit_experts,
        tmp_path / "f",
        digits,
        ipc=2,
        overrides={"iterations": 30, "log_every": 1, "crop_scale": [1.0, 1.0], "jitter": 0, "lr": 0.05},
    )
    losses = [r["loss"] for r in res.meta["units"][0]["records"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    for p in paths:  # the files on disk are untouched
        after = load_expert(p).model.state_dict()
        assert all(torch.equal(before[p.stem][k], v) for k, v in after.items())


def test_recover_leaves_no_hooks_and_no_grads(digit_experts: Path, digits, tmp_path: Path) -> None:
    from cvdd.api import load_pool
    from cvdd.synthesis.recover import RecoverConfig, recover_images

    pool = load_pool(digit_experts)
    state = {e.name: {k: v.clone() for k, v in e.model.state_dict().items()} for e in pool}
    cfg = RecoverConfig(ipc=1, iterations=5, init="gaussian", log_every=5)
    recover_images(pool, cfg, tmp_path / "h", data=None, progress=False)
    for e in pool:
        assert all(not m._forward_hooks for m in e.model.modules())
        assert all(p.grad is None and not p.requires_grad for p in e.model.parameters())
        assert all(torch.equal(state[e.name][k], v) for k, v in e.model.state_dict().items())


def test_bad_recover_options(digit_experts: Path, digits, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="committee size 3 is larger than the pool of 2 experts"):
        _recover(digit_experts, tmp_path / "x", digits, committee_size=3)
    with pytest.raises(ConfigError, match="ipc must be at least 1"):
        _recover(digit_experts, tmp_path / "x", digits, ipc=0)
    with pytest.raises(ConfigError, match="unknown key 'rbn'"):
        _recover(digit_experts, tmp_path / "x", digits, overrides={"rbn": 1.0})
    with pytest.raises(ArtifactError, match="no experts found"):
        cvdd.recover(tmp_path, tmp_path / "x", progress=False)


def test_export_png_and_jpeg(digit_experts: Path, digits, tmp_path: Path) -> None:
    _recover(digit_experts, tmp_path / "e", digits, ipc=1, committee_size=1)
    assert cvdd.export(tmp_path / "e", tmp_path / "png") == 10
    files = sorted((tmp_path / "png").rglob("*.png"))
    assert len(files) == 10 and files[0].parent.name == "0"
    import numpy as np
    from PIL import Image

    images, _, _ = load_synthetic(tmp_path / "e")  # PNG is lossless: the file holds the rounded pixels
    first = torch.from_numpy(np.array(Image.open(tmp_path / "png" / "0" / "0_0000.png")))
    assert torch.equal(first.permute(2, 0, 1), (images[0] * 255).round().to(torch.uint8))
    assert cvdd.export(tmp_path / "e", tmp_path / "jpg", format="jpeg") == 10
    assert len(list((tmp_path / "jpg").rglob("*.jpg"))) == 10


def test_a_uint8_set_returns_the_pixels_it_stores(digit_experts: Path, digits, tmp_path: Path) -> None:
    """store=uint8: recover returns the quantised pixels, as a rerun and every torchrun rank read them from disk,
    kept as uint8 (no float32 copy of the set), and quantising unit by unit gives the pixels of quantising the
    float set; the grid shows the same image either way."""
    from PIL import Image

    floats = _recover(digit_experts, tmp_path / "f", digits, ipc=2, overrides={"init": "real"})
    q = _recover(digit_experts, tmp_path / "q", digits, ipc=2, overrides={"init": "real", "store": "uint8"})
    images, _, _ = load_synthetic(tmp_path / "q")
    assert torch.equal(q.images, images) and q.images.dtype == torch.uint8
    assert torch.equal(q.images, (floats.images * 255).round().to(torch.uint8))
    grids = [np.asarray(Image.open(tmp_path / d / "grid.png")) for d in ("f", "q")]
    assert np.array_equal(*grids)
    again = _recover(digit_experts, tmp_path / "q", digits, ipc=2, overrides={"init": "real", "store": "uint8"})
    assert again.units_run == 0 and torch.equal(again.images, q.images)


def test_recover_on_a_cifar_slice(cifar_slice: Path, tmp_path: Path) -> None:
    experts = tmp_path / "experts"
    cvdd.squeeze(
        cifar_slice, archs=["convnet_d3_w32", "resnet8"], out=experts, preset="cifar10-cpu", epochs=1, progress=False
    )
    # The preset compiles its experts; 12 iterations would mostly time the compilation (24 s with a cold cache in a
    # fresh clone, 7 s warm), and compiled recover has its own tests (tests/test_precision.py).
    over = {**TINY, "compile": False}
    for n in (1, 2):
        res = cvdd.recover(
            experts, tmp_path / f"syn{n}", ipc=2, committee_size=n, preset="cifar10-cpu", overrides=over, progress=False
        )
        assert res.images.shape == (20, 3, 32, 32) and res.meta["dataset"]["name"] == "cifar10"


def test_recover_cli(digit_experts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "recover",
            "--experts",
            str(digit_experts),
            "--out",
            str(tmp_path / "cli"),
            "--ipc",
            "1",
            "--iterations",
            "4",
            "--set",
            "init_candidates=10",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "IPC 0:" in out and "synthetic.safetensors" in out
    assert main(["export", str(tmp_path / "cli"), "--out", str(tmp_path / "png"), "--quiet"]) == 0


def test_bn_groups_ipc_is_the_per_index_loss(digit_experts: Path, digits, tmp_path: Path) -> None:
    """bn_groups=ipc: one BN statistic per IPC index of a unit; with one index per unit it changes nothing."""
    base = {"init": "real", "classes_per_block": 10}
    one_block = _recover(digit_experts, tmp_path / "b1", digits, ipc=2, overrides={**base, "ipc_per_block": 1})
    one_ipc = _recover(
        digit_experts, tmp_path / "i1", digits, ipc=2, overrides={**base, "ipc_per_block": 1, "bn_groups": "ipc"}
    )
    # The same loss up to where the voter weight multiplies (inside the BN sum instead of outside): rounding only.
    assert torch.allclose(one_block.images, one_ipc.images, atol=1e-5)
    two_block = _recover(digit_experts, tmp_path / "b2", digits, ipc=2, overrides={**base, "ipc_per_block": 2})
    two_ipc = _recover(
        digit_experts, tmp_path / "i2", digits, ipc=2, overrides={**base, "ipc_per_block": 2, "bn_groups": "ipc"}
    )
    assert two_ipc.images.shape == two_block.images.shape == (20, 3, 32, 32)
    assert not torch.equal(two_block.images, two_ipc.images)
    # The default keeps the configuration hash of runs made before the field existed; the other value changes it.
    hashes = {r.meta["config_hash"] for r in (one_block, one_ipc, two_block, two_ipc)}
    assert len(hashes) == 4
    with pytest.raises(ConfigError, match="bn_groups"):
        _recover(digit_experts, tmp_path / "bad", digits, ipc=2, overrides={"bn_groups": "layer"})


def test_checkpointed_experts_recover_the_same_images(digit_experts: Path, digits, tmp_path: Path) -> None:
    """checkpoint=True: the experts' blocks are recomputed in the backward pass; the pixels do not change."""
    over = {"init": "real", "classes_per_block": 10, "ipc_per_block": 2, "log_every": 4}
    plain = _recover(digit_experts, tmp_path / "plain", digits, ipc=2, overrides=over)
    ckpt = _recover(digit_experts, tmp_path / "ckpt", digits, ipc=2, overrides={**over, "checkpoint": True})
    assert torch.allclose(plain.images, ckpt.images, atol=1e-6)
    # Not part of the identity: a finished (or interrupted) run is resumed with checkpointing turned on.
    assert plain.meta["config_hash"] == ckpt.meta["config_hash"]
    resumed = _recover(digit_experts, tmp_path / "plain", digits, ipc=2, overrides={**over, "checkpoint": True})
    assert resumed.units_run == 0 and torch.equal(resumed.images, plain.images)
    with pytest.raises(ConfigError, match="checkpoint and compile"):
        _recover(digit_experts, tmp_path / "bad", digits, ipc=2, overrides={"checkpoint": True, "compile": True})
