"""`cvdd distill` end to end on the embedded digits (tiny budget in the default suite, full budget marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.cli import main

ROW_KEYS = {
    "dataset",
    "method",
    "ipc",
    "student",
    "label_mode",
    "seeds",
    "acc",
    "acc_mean",
    "acc_std",
    "ior",
    "hlr",
    "seconds",
    "hard_acc",
    "hard_acc_mean",
    "label_bytes",
}


def _check_results(out: Path, methods: list[str], ipcs: list[int], seeds: list[int]) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == len(methods) * len(ipcs)
    for r in rows:
        assert set(r) >= ROW_KEYS, set(ROW_KEYS) - set(r)
        assert r["seeds"] == seeds and len(r["acc"]) == len(seeds)
        assert all(0.0 <= a <= 1.0 for a in r["acc"]) and r["acc_mean"] == pytest.approx(sum(r["acc"]) / len(seeds))
        assert set(r["seconds"]) == {"squeeze", "recover", "relabel", "evaluate"}
        if r["method"] == "random-real":
            assert r["ior"] == 0.0
    table = (out / "results.md").read_text()
    assert "| method | IPC |" in table and all(m in table for m in methods)
    assert (out / "config.json").is_file()
    for m in methods:
        for ipc in ipcs:
            assert (out / m / f"ipc{ipc}" / "grid.png").is_file()
    return rows


def test_distill_tiny_budget_writes_valid_results(tmp_path: Path, digits, monkeypatch, caplog) -> None:
    methods, seeds = ["random-real", "sre2l++", "cvdd"], [0, 1]
    cvdd.distill(
        digits,
        tmp_path,
        ipcs=[1, 2],  # two IPCs: the second's rows are reused on a rerun too (their key once changed in between)
        seeds=seeds,
        overrides={"epochs": 2, "label_mode": "stored"},
        recover_overrides={"iterations": 5, "init_candidates": 20, "init_crops": 2},
        squeeze_overrides={"epochs": 2},  # the pipeline's squeeze runs; good experts are not the point here
        progress=False,
    )
    rows = _check_results(tmp_path, methods, [1, 2], seeds)
    assert all(r["label_mode"] == "stored" and r["label_bytes"] > 0 for r in rows)
    assert (tmp_path / "cvdd" / "ipc1" / "labels" / "epoch_0000.safetensors").is_file()

    table = (tmp_path / "results.md").read_text()
    assert "another build" not in table
    # the priors' source beside the numbers (no `cvdd prior` run: the experts' training accuracy, never the test's)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {p["source"] for p in config["priors"].values()} == {"train_acc"}
    assert "Voting and teacher priors: convnet_d3_w32 " in table and "(training accuracy)" in table
    assert "the std covers the students' initial weights only" in table

    # A re-run (for example after a kill) reuses every finished piece: experts, units, labels, evaluations; made by
    # another build of cvdd (here: another source hash), it keeps them and says so, in the log and the table.
    row_file = tmp_path / "cvdd" / "ipc1" / "row.json"
    stamp = row_file.stat().st_mtime_ns
    stamp2 = (tmp_path / "cvdd" / "ipc2" / "row.json").stat().st_mtime_ns
    monkeypatch.setattr("cvdd.artifacts._source_fingerprint", lambda: "newer0source")
    again = cvdd.distill(
        digits,
        tmp_path,
        ipcs=[1, 2],  # two IPCs: the second's rows are reused on a rerun too (their key once changed in between)
        seeds=seeds,
        overrides={"epochs": 2, "label_mode": "stored"},
        recover_overrides={"iterations": 5, "init_candidates": 20, "init_crops": 2},
        squeeze_overrides={"epochs": 2},
        progress=False,
    )
    assert row_file.stat().st_mtime_ns == stamp and [r["acc"] for r in again] == [r["acc"] for r in rows]
    assert (tmp_path / "cvdd" / "ipc2" / "row.json").stat().st_mtime_ns == stamp2
    warned = [r.getMessage() for r in caplog.records if "not by this cvdd" in r.getMessage()]
    for what in ("finished recover units", "finished evaluations at IPC 1"):  # (relabel: tests/labels)
        assert any(what in m and "newer0source" in m for m in warned), (what, warned)
    table = (tmp_path / "results.md").read_text()
    assert "measured by another build than this run's (cvdd" in table and "source newer0source" in table
    # A changed recipe is not served from the cache.
    cvdd.distill(
        digits,
        tmp_path,
        ipcs=[1],
        seeds=seeds,
        overrides={"epochs": 1, "label_mode": "online"},
        recover_overrides={"iterations": 5, "init_candidates": 20, "init_crops": 2},
        squeeze_overrides={"epochs": 2},
        progress=False,
    )
    assert row_file.stat().st_mtime_ns != stamp


def test_distill_cli_reuses_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "distill",
        "--out",
        str(tmp_path),
        "--methods",
        "random-real",
        "sre2l++",
        "--ipc",
        "1",
        "--seeds",
        "0",
        "--set",
        "epochs=1",  # a bare key: the evaluation recipe
        "--set",
        "label_mode=stored",  # stored labels: --restart below must discard the changed set's labels too
        "--set",
        "squeeze.epochs=2",
        "--set",
        "recover.iterations=3",
        "--quiet",
    ]
    assert main(args) == 0
    # Each stage got its own --set: the experts' recipe, the recovered set, the evaluation recipe.
    expert = json.loads(next((tmp_path / "experts").glob("*.json")).read_text())
    assert expert["recipe"]["epochs"] == 2
    synthetic = json.loads((tmp_path / "sre2l++" / "ipc1" / "synthetic.json").read_text())
    assert synthetic["config"]["iterations"] == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preset"]["evaluate"]["epochs"] == 1
    assert config["squeeze_overrides"] == {"epochs": 2} and config["recover_overrides"] == {"iterations": 3}
    assert (
        "Changed from the presets (`digits` squeeze, `digits` recover): squeeze {'epochs': 2}; recover "
        in (tmp_path / "results.md").read_text()
    )
    capsys.readouterr()
    # Another recover setting: the finished units are refused with the flag of this very command, and --restart
    # discards them (the experts stay: squeeze is not part of it).
    experts_stamp = next((tmp_path / "experts").glob("*.safetensors")).stat().st_mtime_ns
    real_row = (tmp_path / "random-real" / "ipc1" / "row.json").stat().st_mtime_ns
    labels_before = json.loads((tmp_path / "sre2l++" / "ipc1" / "labels" / "labels.json").read_text())
    changed = [a if a != "recover.iterations=3" else "recover.iterations=4" for a in args]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "--restart (cvdd recover, cvdd distill)" in err
    assert main([*changed, "--restart", "--no-report"]) == 0  # the experts of the first run are reused
    out = capsys.readouterr().out
    assert "| random-real | 1 |" in out and "| sre2l++ | 1 |" in out and "results.json" in out
    synthetic = json.loads((tmp_path / "sre2l++" / "ipc1" / "synthetic.json").read_text())
    assert synthetic["config"]["iterations"] == 4
    labels_after = json.loads((tmp_path / "sre2l++" / "ipc1" / "labels" / "labels.json").read_text())
    assert labels_after["ident"]["data"] != labels_before["ident"]["data"]  # relabelled for the new images
    # what still matches is kept: the experts and the random-real row
    assert next((tmp_path / "experts").glob("*.safetensors")).stat().st_mtime_ns == experts_stamp
    assert (tmp_path / "random-real" / "ipc1" / "row.json").stat().st_mtime_ns == real_row


@pytest.mark.slow
def test_default_digits_distill_is_sane(tmp_path: Path, digits) -> None:
    """The README's main command at its default budget: every method well above chance (10%), reported as measured.

    This asserts the pipeline's sanity, never a scientific ordering of the methods.
    """
    rows = cvdd.distill(digits, tmp_path, progress=False)
    _check_results(tmp_path, ["random-real", "sre2l++", "cvdd"], [1, 10], [0, 1, 2])
    for r in rows:
        assert r["acc_mean"] > 0.15, r


def test_relabel_and_evaluate_cli(
    digit_experts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    syn = tmp_path / "syn"
    assert (
        main(
            [
                "recover",
                "--experts",
                str(digit_experts),
                "--out",
                str(syn),
                "--ipc",
                "1",
                "--iterations",
                "3",
                "--init",
                "real",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["relabel", str(syn), "--experts", str(digit_experts), "--set", "epochs=2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stored soft labels: 2 files" in out and "bytes" in out
    assert len(list((syn / "labels").glob("epoch_*.safetensors"))) == 2
    assert (
        main(
            [
                "evaluate",
                str(syn),
                "--experts",
                str(digit_experts),
                "--labels",
                "stored",
                "--epochs",
                "2",
                "--seeds",
                "0",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "top-1 on the real test set:" in out and "over seeds [0, 1]" in out and "bytes" in out
    # Labels stored elsewhere (relabel --out) are found with evaluate --label-dir.
    elsewhere = tmp_path / "elsewhere"
    relabel = ["relabel", str(syn), "--experts", str(digit_experts), "--set", "epochs=2", "--out", str(elsewhere)]
    assert main([*relabel, "--teacher", "resnet8", "--no-bssl", "--quiet"]) == 0
    teacher = json.loads((elsewhere / "labels.json").read_text())["ident"]["teacher"]
    assert teacher["experts"] == ["resnet8"] and teacher["bssl"] is False
    stored = {f: f.stat().st_mtime_ns for f in elsewhere.glob("epoch_*.safetensors")}
    evaluate = ["evaluate", str(syn), "--experts", str(digit_experts), "--labels", "stored", "--epochs", "2"]
    evaluate += ["--teacher", "resnet8", "--no-bssl", "--seeds", "0", "--label-dir", str(elsewhere), "--quiet"]
    assert len(stored) == 2 and main(evaluate) == 0
    assert "over seeds [0]" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in elsewhere.glob("epoch_*.safetensors")} == stored  # read, not rewritten
    # relabel's plans follow the recipe's first student seed by default: the seed whose plans evaluate replays.
    seeded = tmp_path / "seeded"
    relabel = ["relabel", str(syn), "--experts", str(digit_experts), "--set", "epochs=2", "--out", str(seeded)]
    assert main([*relabel, "--set", "seeds=[5, 6]", "--quiet"]) == 0
    assert json.loads((seeded / "labels.json").read_text())["ident"]["settings"]["seed"] == 5
    evaluate = ["evaluate", str(syn), "--experts", str(digit_experts), "--labels", "stored", "--epochs", "2"]
    assert main([*evaluate, "--seeds", "5", "--label-dir", str(seeded), "--quiet"]) == 0
    capsys.readouterr()
    # random-real: relabel and evaluate agree on the default folder, runs/random-real-ipc<N>/labels.
    monkeypatch.chdir(tmp_path)
    rr = ["random-real", "--ipc", "1", "--experts", str(digit_experts)]
    assert main(["relabel", *rr, "--set", "epochs=2", "--quiet"]) == 0
    shards = sorted((tmp_path / "runs" / "random-real-ipc1" / "labels").glob("epoch_*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in shards]
    assert len(shards) == 2
    assert main(["evaluate", *rr, "--labels", "stored", "--epochs", "2", "--seeds", "0", "--quiet"]) == 0
    assert [f.stat().st_mtime_ns for f in shards] == stamps and not (tmp_path / "runs" / "labels").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "random-real",
                "--ipc",
                "2",
                "--experts",
                str(digit_experts),
                "--labels",
                "hard",
                "--epochs",
                "2",
                "--seeds",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["evaluate", "random-real", "--experts", str(digit_experts), "--quiet"]) == 2
    assert "needs --ipc" in capsys.readouterr().err

    assert cvdd.info(syn)["kind"] == "synthetic" and cvdd.info(syn)["ipc"] == 1
    labels = cvdd.info(syn / "labels")
    assert labels["kind"] == "stored labels" and labels["epochs"] == 2 and labels["bssl"] is True
    expert = cvdd.info(digit_experts / "resnet8.safetensors")
    assert expert["kind"] == "expert" and expert["arch"] == "resnet8" and expert["classes"] == 10
    assert cvdd.info(digit_experts)["kind"] == "experts folder"
    assert main(["info", str(syn), "--quiet"]) == 0
    assert "committee_policy" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing"), "--quiet"]) == 2


def test_distill_with_stack_seeds_trains_every_student_of_an_ipc_at_once(
    tmp_path: Path, digit_experts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Soft and hard students of all three methods as one stack: the rows of the one-by-one pipeline, in order."""
    kw = {
        "experts": digit_experts,
        "ipcs": [2],
        "seeds": [0, 1],
        "recover_overrides": {"iterations": 5, "init": "real"},
        "progress": False,
    }
    plain = cvdd.distill("digits", tmp_path / "plain", overrides={"epochs": 4, "label_mode": "stored"}, **kw)
    with caplog.at_level("INFO", logger="cvdd.engine.stacked"):
        stacked = cvdd.distill(
            "digits", tmp_path / "stacked", overrides={"epochs": 4, "label_mode": "stored", "stack_seeds": True}, **kw
        )
    # 3 methods x (2 soft + 2 hard students) = 12 members of one stack, 4 epochs.
    assert sum("for 12 members" in r.getMessage() for r in caplog.records) == 4
    _check_results(tmp_path / "stacked", ["random-real", "sre2l++", "cvdd"], [2], [0, 1])
    assert [r["method"] for r in stacked] == [r["method"] for r in plain]
    # The same students up to rounding (the stack runs NCHW, fit channels_last): measured equal or one test image.
    for a, b in zip(plain, stacked):
        assert max(abs(x - y) for x, y in zip(a["acc"] + a["hard_acc"], b["acc"] + b["hard_acc"])) <= 0.02
    # The three sets' evaluations shared one run: their evaluate seconds add up to its wall time, no set's is 0.
    assert all(r["seconds"]["evaluate"] > 0 for r in stacked)
    assert not any((tmp_path / "stacked" / m / "ipc2" / "students").exists() for m in ("random-real", "cvdd"))


@pytest.mark.parametrize("key", ["ipc", "committee_size"])
def test_api_distill_refuses_recover_fields_the_pipeline_sets(key: str, tmp_path: Path, digits) -> None:
    # Through the API too (not only the CLI's --set): the pipeline would replace them per method and IPC silently.
    from cvdd.errors import ConfigError

    with pytest.raises(
        ConfigError, match=f"recover option '{key}': the pipeline \\(per method and IPC\\) sets it itself"
    ):
        cvdd.distill(digits, tmp_path / "run", ipcs=[1], recover_overrides={key: 3}, progress=False)
    assert not (tmp_path / "run" / "experts").exists()  # refused before squeeze started


def test_method_overrides_make_sre2l_one_expert_under_any_committee_policy() -> None:
    from cvdd.config import get_recover_preset
    from cvdd.pipeline import method_overrides

    paper = get_recover_preset("cifar10-ipc1")  # a fixed pair for CV-DD
    assert method_overrides("sre2l++", 1, paper) == {
        "ipc": 1,
        "committee_size": 1,
        "ipc_per_block": 1,
        "committee": "single",
    }
    assert method_overrides("cvdd", 1, paper) == {"ipc": 1, "committee_size": 2, "ipc_per_block": 1}
    auto = get_recover_preset("cifar10-cpu")  # auto resolves to single itself: no override, the hash is kept
    assert "committee" not in method_overrides("sre2l++", 10, auto)


def test_finished_rows_are_keyed_on_the_teacher() -> None:
    from cvdd.evaluation.student import EvalConfig
    from cvdd.pipeline import _data_digest, _row_key

    images, labels, cfg = torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), EvalConfig()
    teacher = {"experts": ["a"], "weights": [1.0], "bssl": True, "group_size": 8, "files": ["0123"]}
    data = _data_digest(images, labels)
    key = _row_key(data, cfg, teacher)
    assert key == _row_key(_data_digest(images.clone(), labels), cfg, dict(teacher))
    assert key == _row_key(data, cfg, teacher)  # the digest is not consumed by a key
    assert key != _row_key(data, cfg, {**teacher, "files": ["4567"]})  # experts squeezed again
    assert key != _row_key(data, cfg, {**teacher, "weights": [0.9]})  # a prior measured since
    assert key != _row_key(_data_digest(images + 1, labels), cfg, teacher)
    # Rows finished by an older cvdd are still found: keyed on the reference student's accuracy too (its HLR is now
    # recomputed on reuse), or without the teacher, with the experts' names.
    import hashlib
    import json as _json

    for who, kwargs in (
        ({"teacher": teacher}, {"teacher": teacher}),
        ({"experts": ["a"]}, {"teacher": None, "experts": ["a"]}),
    ):
        old = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes())
        old.update(_json.dumps({"cfg": cfg.identity(), "ref": 0.5, **who}, sort_keys=True).encode())
        assert _row_key(data, cfg, ref=0.5, **kwargs) == old.hexdigest()[:24]


def test_a_reused_row_takes_the_reference_of_this_run(
    tmp_path: Path, digits, digit_experts: Path, caplog, monkeypatch
) -> None:
    """A changed accuracy of the reference student (the student architecture's expert, squeezed on all the data)
    changes only the HLR column: the finished evaluation is reused and saved again with the new HLR, under a key
    that leaves the reference out (a row of an older cvdd, keyed on it, is reused while the reference is the one it
    was made with, and re-keyed then)."""
    import cvdd.pipeline as pipeline

    keyed: list[tuple] = []  # the arguments of this cvdd's key, to build an older cvdd's key of the same row
    real_key = pipeline._row_key
    monkeypatch.setattr(pipeline, "_row_key", lambda *a, **k: (keyed.append(a) if not k else None) or real_key(*a, **k))
    import shutil

    shutil.copytree(digit_experts, tmp_path / "experts")  # a copy: the reference's metadata is edited below
    kw = dict(methods=["random-real"], ipcs=[1], seeds=[0], overrides={"epochs": 1}, progress=False)
    kw["experts"] = tmp_path / "experts"
    first = cvdd.distill(digits, tmp_path, **kw)[0]
    row_file = tmp_path / "random-real" / "ipc1" / "row.json"
    ref = json.loads((tmp_path / "config.json").read_text())["full_real_hard_acc"]
    assert first["hlr"] == pytest.approx(ref - first["hard_acc_mean"])
    experts = (tmp_path / "experts").glob("*.json")
    (meta_path,) = [p for p in experts if json.loads(p.read_text())["arch"] == "convnet_d3_w32"]
    saved = json.loads(row_file.read_text())
    for shift in (0.25, 0.5):
        meta = json.loads(meta_path.read_text())
        meta["test_acc"] = ref - shift  # the reference's accuracy as another squeeze of it measured it
        meta_path.write_text(json.dumps(meta))
        if shift == 0.5:  # a row an older cvdd finished with this reference: keyed on its accuracy, then re-keyed
            old_key = real_key(*keyed[0], ref=ref - 0.5)
            row_file.write_text(json.dumps({"key": old_key, "row": saved["row"]}))
        caplog.clear()
        with caplog.at_level("INFO", logger="cvdd.pipeline"):
            again = cvdd.distill(digits, tmp_path, **kw)[0]
        assert "reusing the finished evaluation" in caplog.text and again["acc"] == first["acc"]
        assert again["hlr"] == pytest.approx(ref - shift - first["hard_acc_mean"])
        on_disk = json.loads(row_file.read_text())
        assert on_disk["key"] == saved["key"] and on_disk["row"]["hlr"] == again["hlr"]


def test_one_seed_shows_no_spread() -> None:
    from cvdd.reporting import _pm, mean_std

    assert mean_std(0.4567, 0.0123, 3) == "45.67 ± 1.23" and mean_std(0.4567, 0.0, 1) == "45.67 (1 seed)"
    assert _pm(0.4567, 0.0123, [0, 1]) == "45.67 ± 1.23" and _pm(0.4567, 0.0, [0]) == "45.67 (1 seed)"
    assert _pm(None, None, [0]) == "-"


def test_a_distill_killed_in_its_squeeze_finishes_the_committee(digit_experts: Path, tmp_path: Path) -> None:
    """An experts folder that distill began squeezing (its marker) and that holds part of the preset's committee is
    squeezed to the end on a rerun; experts the user squeezed, even with the preset's name, are used as they are."""
    import shutil

    from cvdd.pipeline import SQUEEZE_MARKER, _unfinished_squeeze

    part = tmp_path / "part"
    part.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(digit_experts / f"resnet8{suffix}", part / f"resnet8{suffix}")
    assert not _unfinished_squeeze(part, "digits", 0)  # no marker: the user's committee
    (part / SQUEEZE_MARKER).write_text(json.dumps({"preset": "digits", "seed": 0}))
    assert _unfinished_squeeze(part, "digits", 0)  # convnet_d3_w32 is missing
    assert not _unfinished_squeeze(part, "digits", 1)  # another seed: not this run's squeeze
    for suffix in (".json", ".safetensors"):
        shutil.copy(digit_experts / f"convnet_d3_w32{suffix}", part / f"convnet_d3_w32{suffix}")
    assert not _unfinished_squeeze(part, "digits", 0)  # complete
