"""BSSL teacher, per-epoch plans and stored labels: golden behaviour and online/stored equivalence."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cvdd.artifacts import build_stamp
from cvdd.data.augment import Normalize
from cvdd.data.specs import DatasetSpec
from cvdd.engine import fit
from cvdd.errors import ArtifactError, ConfigError
from cvdd.evaluation.student import EvalConfig, SyntheticBatches, kd_loss
from cvdd.experts import Expert
from cvdd.labels import LabelSettings, Teacher, bssl_mode, load_shard, relabel_stored
from cvdd.labels.bssl import build_teacher
from cvdd.labels.plans import apply_plan
from cvdd.labels.stored import plan_for_epoch, teacher_logits
from cvdd.models import create_model

SPEC = DatasetSpec("toy", tuple("abcd"), 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CPU = torch.device("cpu")


def _expert(seed: int, dropout: bool = False) -> Expert:
    torch.manual_seed(seed)
    model = create_model("convnet_d3_w32", 4, 16)
    if dropout:
        model.classifier = nn.Sequential(nn.Dropout(0.5), model.classifier)
    with torch.no_grad():  # non-trivial running statistics, as a trained expert has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Expert(f"e{seed}", "convnet_d3_w32", model, {"test_acc": 0.9, "train_acc": 0.5 + seed / 100}, SPEC)


def test_bssl_equals_manual_batch_statistics_and_leaves_the_expert_untouched() -> None:
    e = _expert(0)
    x = torch.randn(8, 3, 16, 16)
    before = {k: v.clone() for k, v in e.model.state_dict().items()}
    manual = copy.deepcopy(e.model).train()  # train-mode BN = batch statistics (running stats of the copy drift)
    expected = manual(x)
    got = Teacher([e], [1.0], bssl=True)(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, e.model(x), atol=1e-3)  # differs from running-statistics (eval) labels
    assert all(torch.equal(before[k], v) for k, v in e.model.state_dict().items())
    bns = [m for m in e.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and m.track_running_stats for m in bns)


def test_bssl_keeps_dropout_off_and_restores_after_errors() -> None:
    e = _expert(1, dropout=True)
    x = torch.randn(6, 3, 16, 16)
    t = Teacher([e], [1.0])
    assert torch.equal(t(x), t(x))
    with pytest.raises(RuntimeError), bssl_mode(e.model):
        raise RuntimeError
    assert all(not m.training for m in e.model.modules())


def test_group_size_is_the_bn_group_and_weights_sum_logits() -> None:
    a, b = _expert(2), _expert(3)
    x = torch.randn(8, 3, 16, 16)
    grouped = Teacher([a, b], [0.25, 0.75], group_size=4)(x)
    halves = torch.cat([Teacher([a, b], [0.25, 0.75])(x[:4]), Teacher([a, b], [0.25, 0.75])(x[4:])])
    assert torch.allclose(grouped, halves, atol=1e-6)
    single = 0.25 * Teacher([a], [1.0], group_size=4)(x) + 0.75 * Teacher([b], [1.0], group_size=4)(x)
    assert torch.allclose(grouped, single, atol=1e-5)


def test_build_teacher_weights_the_committee_by_prior_or_takes_the_named_expert() -> None:
    pool = [_expert(4), _expert(9)]  # priors 54 and 59 (%, from train_acc; never the test accuracy)
    committee = build_teacher(pool, EvalConfig(teacher="committee", teacher_temperature=10.0, bssl=False))
    # softmax([54, 59] / 10) = softmax([5.4, 5.9]): golden values
    assert committee.weights == pytest.approx([0.3775407, 0.6224593], abs=1e-6)
    assert committee.bssl is False
    assert build_teacher(pool, EvalConfig(teacher="committee"), equal=True).weights == [0.5, 0.5]  # cvdd prior
    pool[1].meta["prior"] = 64.0  # one measured prior: two scales in one softmax, so equal until all are measured
    assert build_teacher(pool, EvalConfig(teacher="committee")).weights == [0.5, 0.5]
    pool[0].meta["prior"] = 54.0  # measured priors win over the training accuracy
    weights = build_teacher(pool, EvalConfig(teacher="committee", teacher_temperature=10.0)).weights
    assert weights == pytest.approx([0.2689414, 0.7310586], abs=1e-6)  # softmax([5.4, 6.4]) = 1 / (1 + e), e / (1 + e)
    del pool[0].meta["prior"]
    del pool[0].meta["train_acc"]  # one expert without any prior: the whole pool votes equally
    assert build_teacher(pool, EvalConfig(teacher="committee")).weights == [0.5, 0.5]
    single = build_teacher(pool, EvalConfig(teacher="e9"))
    assert single.names == ["e9"] and single.weights == [1.0] and single.bssl is True
    with pytest.raises(ConfigError, match="teacher 'resnet99' is not among the experts \\(e4, e9\\)"):
        build_teacher(pool, EvalConfig(teacher="resnet99"))


def test_teacher_layout_changes_speed_not_labels() -> None:
    """channels_last (default) and NCHW teachers give the same BSSL logits; the layout is not in its identity."""
    a, b = _expert(4), _expert(5)
    x = torch.randn(8, 3, 16, 16)
    t = Teacher([a, b], [0.5, 0.5], group_size=4)
    nhwc = t(x)
    assert a.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    described = t.describe()
    t.channels_last = False
    nchw = t(x)
    assert a.model.features[0].weight.is_contiguous() and torch.allclose(nhwc, nchw, atol=1e-5)
    assert t.describe() == described


def _toy_set(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(4).repeat_interleave(n // 4)


def test_stored_shards_replay_the_exact_inputs_and_logits(tmp_path: Path) -> None:
    images, labels = _toy_set()
    teacher = Teacher([_expert(0), _expert(1)], [0.4, 0.6], group_size=4)
    settings = LabelSettings(epochs=3, batch_size=8, micro_batch=4, seed=11, dtype="fp32")
    info = relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "labels", progress=False)
    assert info["files"] == 3 and len(list((tmp_path / "labels").glob("epoch_*.safetensors"))) == 3
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [  # one file per epoch, plus the index
        "epoch_0000.safetensors",
        "epoch_0001.safetensors",
        "epoch_0002.safetensors",
        "labels.json",
    ]
    assert info["bytes"] > 0
    norm = Normalize(SPEC)
    for e in range(3):
        plan, logits = load_shard(tmp_path / "labels", e, settings, 4, CPU)
        fresh = plan_for_epoch(settings, len(labels), 16, e, CPU)
        for step in range(plan.num_batches):  # replayed inputs are bit-identical to the labelled ones
            assert torch.equal(
                apply_plan(images, labels, plan, step, norm)[0], apply_plan(images, labels, fresh, step, norm)[0]
            )
        assert torch.equal(logits, teacher_logits(images, labels, fresh, teacher, norm, 4))
    # A killed relabel resumes: a missing shard is rebuilt identically.
    shard = tmp_path / "labels" / "epoch_0001.safetensors"
    before = load_file(str(shard))
    shard.unlink()
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "labels", progress=False)
    after = load_file(str(shard))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "labels" / "labels.json").read_text())["builds"] == [build_stamp()]


def test_a_uint8_set_is_labelled_exactly_as_its_float_copy(tmp_path: Path) -> None:
    """Relabelling a uint8 set (held as bytes, batches made floats row by row) writes the shards of its float32 copy,
    and a folder labelled from one is the other's own (completed, not refused)."""
    torch.manual_seed(3)
    u8 = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(4).repeat_interleave(2)
    teacher = Teacher([_expert(0)], [1.0], group_size=4)
    settings = LabelSettings(epochs=2, batch_size=8, micro_batch=4, seed=5, dtype="fp32")
    relabel_stored(u8.float() / 255, labels, SPEC, teacher, settings, tmp_path / "f", progress=False)
    relabel_stored(u8, labels, SPEC, teacher, settings, tmp_path / "u", progress=False)
    for e in range(2):
        a = load_file(str(tmp_path / "f" / f"epoch_{e:04d}.safetensors"))
        b = load_file(str(tmp_path / "u" / f"epoch_{e:04d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idents = [json.loads((tmp_path / d / "labels.json").read_text())["ident"] for d in ("f", "u")]
    assert idents[0] == idents[1]
    (tmp_path / "f" / "epoch_0001.safetensors").unlink()
    relabel_stored(u8, labels, SPEC, teacher, settings, tmp_path / "f", progress=False)
    assert (tmp_path / "f" / "epoch_0001.safetensors").is_file()


def test_relabel_resumed_by_another_build_keeps_its_epochs_and_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    images, labels = _toy_set()
    teacher = Teacher([_expert(0)], [1.0], group_size=4)
    settings = LabelSettings(epochs=3, batch_size=8, micro_batch=4, seed=11)
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path, progress=False)
    old = build_stamp()
    kept = (tmp_path / "epoch_0000.safetensors").stat().st_mtime_ns
    (tmp_path / "epoch_0002.safetensors").unlink()  # killed before its last epoch
    monkeypatch.setattr("cvdd.artifacts._source_fingerprint", lambda: "newer0source")
    info = relabel_stored(images, labels, SPEC, teacher, settings, tmp_path, progress=False)
    assert (tmp_path / "epoch_0000.safetensors").stat().st_mtime_ns == kept  # finished work is never lost
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(f"2 of 2 stored label epochs in {tmp_path} were made by cvdd")
    assert f"(source {old['source']})" in warned[0] and "not by this cvdd" in warned[0]
    assert info["builds"] == [old, build_stamp()] and build_stamp()["source"] == "newer0source"
    caplog.clear()
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path, progress=False)
    assert "1 of 3 stored label epochs" not in caplog.text and "2 of 3 stored label epochs" in caplog.text


def test_stored_labels_of_another_set_or_teacher_file_are_refused(tmp_path: Path) -> None:
    """Labels are keyed by the very pixels and the experts' weight files, not only by names and settings."""
    images, labels = _toy_set()
    settings = LabelSettings(epochs=1, batch_size=8, micro_batch=4, seed=11)
    expert = _expert(0)
    expert.meta["sha256"] = "a" * 64
    relabel_stored(images, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path, progress=False)
    relabel_stored(images, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path, progress=False)
    other = images.clone()
    other[0, 0, 0, 0] += 0.5  # a set recovered again, another draw of random real images...
    with pytest.raises(ArtifactError, match=r"labels made for another synthetic set; choose another folder"):
        relabel_stored(other, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path, progress=False)
    squeezed_again = _expert(0)
    squeezed_again.meta["sha256"] = "b" * 64  # same name, another weight file
    with pytest.raises(ArtifactError, match=r"labels made for another teacher;"):
        relabel_stored(images, labels, SPEC, Teacher([squeezed_again], [1.0], group_size=4), settings, tmp_path)
    with pytest.raises(ArtifactError, match=r"another label settings \(seed"):
        relabel_stored(
            images, labels, SPEC, Teacher([expert], [1.0], group_size=4), LabelSettings(1, 8, 4, seed=12), tmp_path
        )


def test_label_folders_made_before_the_digests_stay_valid(tmp_path: Path) -> None:
    images, labels = _toy_set()
    settings = LabelSettings(epochs=2, batch_size=8, micro_batch=4, seed=11)
    expert = _expert(0)
    expert.meta["sha256"] = "a" * 64
    relabel_stored(images, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path, progress=False)
    meta_path = tmp_path / "labels.json"
    meta = json.loads(meta_path.read_text())
    del meta["ident"]["data"], meta["ident"]["teacher"]["files"]  # as an older cvdd wrote it
    meta_path.write_text(json.dumps(meta))
    kept = (tmp_path / "epoch_0001.safetensors").stat().st_mtime_ns
    relabel_stored(images, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path, progress=False)
    assert (tmp_path / "epoch_0001.safetensors").stat().st_mtime_ns == kept  # reused, not refused or redone
    ident = json.loads(meta_path.read_text())["ident"]
    assert "data" in ident and ident["teacher"]["files"] == ["a" * 16]  # the full identity from now on
    other = images.clone()
    other[0] += 0.25
    with pytest.raises(ArtifactError, match="another synthetic set"):
        relabel_stored(other, labels, SPEC, Teacher([expert], [1.0], group_size=4), settings, tmp_path)


def _train(images, labels, teacher, cfg: EvalConfig, label_dir=None) -> nn.Module:
    torch.manual_seed(5)
    student = create_model("convnet_d3_w32", 4, 16)
    source = SyntheticBatches(images, labels, SPEC, cfg, CPU, label_dir=label_dir, label_seed=cfg.seeds[0])
    fit(
        student,
        source,
        None,
        cfg.recipe(),
        spec=SPEC,
        device=CPU,
        seed=cfg.seeds[0],
        objective=kd_loss(cfg.temperature, teacher),
        progress=False,
    )
    return student


def test_stored_fp32_and_online_give_identical_students_and_fp16_stays_close(tmp_path: Path) -> None:
    images, labels = _toy_set()
    teacher = Teacher([_expert(0), _expert(1)], [0.5, 0.5], group_size=4)
    cfg = EvalConfig(
        student="convnet_d3_w32", epochs=3, batch_size=8, micro_batch=4, temperature=4, seeds=[3], label_dtype="fp32"
    )
    online = _train(images, labels, teacher, cfg)
    relabel_stored(images, labels, SPEC, teacher, cfg.label_settings(3), tmp_path / "fp32", progress=False)
    stored = _train(images, labels, None, cfg, tmp_path / "fp32")
    for a, b in zip(online.state_dict().values(), stored.state_dict().values()):
        assert torch.equal(a, b)  # on the CPU relabel runs one teacher forward per micro-batch, as online

    cfg16 = EvalConfig(**{**cfg.__dict__, "label_dtype": "fp16"})
    relabel_stored(images, labels, SPEC, teacher, cfg16.label_settings(3), tmp_path / "fp16", progress=False)
    _, l32 = load_shard(tmp_path / "fp32", 0, cfg.label_settings(3), 4, CPU)
    _, l16 = load_shard(tmp_path / "fp16", 0, cfg16.label_settings(3), 4, CPU)
    # Stated tolerance: fp16 keeps 11 significant bits, so |error| <= 2^-10 |logit| + 1e-3.
    assert bool(((l16 - l32).abs() <= l32.abs() * 2**-10 + 1e-3).all())
    half = _train(images, labels, None, cfg16, tmp_path / "fp16")
    for a, b in zip(online.parameters(), half.parameters()):
        assert torch.allclose(a, b, atol=1e-2)


def test_topk_storage_keeps_the_largest_logits(tmp_path: Path) -> None:
    images, labels = _toy_set(8)
    teacher = Teacher([_expert(0)], [1.0], group_size=4)
    full = LabelSettings(1, 8, 4, 0, dtype="fp32")
    top = LabelSettings(1, 8, 4, 0, dtype="fp32", topk=2)
    relabel_stored(images, labels, SPEC, teacher, full, tmp_path / "full", progress=False)
    relabel_stored(images, labels, SPEC, teacher, top, tmp_path / "top", progress=False)
    _, a = load_shard(tmp_path / "full", 0, full, 4, CPU)
    _, b = load_shard(tmp_path / "top", 0, top, 4, CPU)
    kept = torch.isfinite(b)
    assert int(kept.sum()) == 16 and torch.equal(a[kept], b[kept])
    assert torch.equal(a.topk(2, dim=1).indices.sort(1).values, kept.nonzero()[:, 1].view(8, 2).sort(1).values)


@pytest.mark.parametrize("channels_last", [True, False])  # the two memory layouts of the grouped statistics
@pytest.mark.parametrize("n", [12, 14])  # 14: a last, smaller group of 2
def test_one_forward_of_all_groups_equals_one_forward_per_group(n: int, channels_last: bool) -> None:
    """The BSSL groups of a batch run as one forward (vectorised per-group BN statistics) with the labels of one
    forward per group; under bf16 autocast too; the expert's BN layers are left as they were."""
    a, b = _expert(6), _expert(7)
    x = torch.randn(n, 3, 16, 16)
    t = Teacher([a, b], [0.3, 0.7], group_size=4)
    t.channels_last = channels_last
    looped = torch.cat([t(part, group=0) for part in x.split(4)])
    together = t(x)
    assert torch.allclose(together, looped, atol=1e-5) and together.shape == (n, 4)
    assert not torch.allclose(together, t(x, group=0), atol=1e-3)  # the groups' statistics, not the batch's
    t.precision = "bf16"
    assert torch.allclose(t(x), torch.cat([t(part, group=0) for part in x.split(4)]), atol=0.1)
    assert all(not m.training and m.track_running_stats for m in a.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert "forward" not in a.model.features[1].__dict__  # the patched forwards are gone


@pytest.mark.parametrize("batch_size, micro_batch", [(8, 4), (6, 4), (8, 0)])
@pytest.mark.parametrize("fuse", [True, False])
def test_teacher_logits_of_an_epoch_match_one_call_per_micro_batch(
    batch_size: int, micro_batch: int, fuse: bool
) -> None:
    """Batches fused into one teacher forward (the default on CUDA, when the batch is a multiple of the
    micro-batch) or one forward per micro-batch give each micro-batch the logits of its own forward."""
    images = torch.rand(22, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(22) % 4  # 22 images: the last batch, and with it the last group, is smaller
    teacher = Teacher([_expert(0), _expert(1)], [0.4, 0.6], group_size=micro_batch)
    settings = LabelSettings(epochs=1, batch_size=batch_size, micro_batch=micro_batch, seed=3, dtype="fp32")
    plan = plan_for_epoch(settings, len(labels), 16, 0, CPU)
    norm = Normalize(SPEC)
    expected = []
    for step in range(plan.num_batches):
        x = apply_plan(images, labels, plan, step, norm)[0]
        expected += [teacher(m, group=0) for m in (x.split(micro_batch) if micro_batch else [x])]
    got = teacher_logits(images, labels, plan, teacher, norm, micro_batch, fuse=fuse)
    assert got.shape == (22, 4) and torch.allclose(got, torch.cat(expected), atol=1e-5)
    if not fuse or micro_batch == 0 or batch_size % micro_batch:  # the very forwards of the loop above
        assert torch.equal(got, torch.cat(expected))


def test_restart_discards_labels_of_another_set_and_keeps_matching_ones(tmp_path: Path) -> None:
    images, labels = _toy_set()
    settings = LabelSettings(epochs=2, batch_size=8, micro_batch=4, seed=11)
    teacher = Teacher([_expert(0)], [1.0], group_size=4)
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path, progress=False)
    before = [load_file(str(tmp_path / f"epoch_{e:04d}.safetensors")) for e in range(2)]
    kept = (tmp_path / "epoch_0000.safetensors").stat().st_mtime_ns
    # restart on matching labels: nothing is discarded (finished work is kept)
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path, progress=False, restart=True)
    assert (tmp_path / "epoch_0000.safetensors").stat().st_mtime_ns == kept
    other = 1 - images  # every pixel differs: no crop of the old epochs can match the new set's logits
    with pytest.raises(ArtifactError, match=r"relabel it there with `cvdd relabel \.\.\. --out DIR --restart`"):
        relabel_stored(other, labels, SPEC, teacher, settings, tmp_path, progress=False)
    info = relabel_stored(other, labels, SPEC, teacher, settings, tmp_path, progress=False, restart=True)
    assert info["files"] == 2
    fresh = tmp_path.parent / "fresh"
    relabel_stored(other, labels, SPEC, teacher, settings, fresh, progress=False)
    for e in range(2):  # the restarted folder holds exactly the labels of a fresh one, not the old epochs
        a = load_file(str(tmp_path / f"epoch_{e:04d}.safetensors"))
        b = load_file(str(fresh / f"epoch_{e:04d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(_logits_of(a), _logits_of(before[e]))
    # the description now names the new set: a plain rerun accepts it
    relabel_stored(other, labels, SPEC, teacher, settings, tmp_path, progress=False)


def _logits_of(shard: dict[str, torch.Tensor]) -> torch.Tensor:
    return shard["logits"] if "logits" in shard else shard["topk_values"]


def test_label_epochs_without_a_description_or_with_an_unreadable_one_are_not_reused(tmp_path: Path) -> None:
    images, labels = _toy_set()
    settings = LabelSettings(epochs=1, batch_size=8, micro_batch=4, seed=11)
    teacher = Teacher([_expert(0)], [1.0], group_size=4)
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "ref", progress=False)
    ref = load_file(str(tmp_path / "ref" / "epoch_0000.safetensors"))
    relabel_stored(1 - images, labels, SPEC, teacher, settings, tmp_path / "x", progress=False)
    (tmp_path / "x" / "labels.json").unlink()  # epochs of unknown origin: relabel writes its description first
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "x", progress=False)
    got = load_file(str(tmp_path / "x" / "epoch_0000.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    (tmp_path / "x" / "labels.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"holds an unreadable labels\.json"):
        relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "x", progress=False)
    relabel_stored(images, labels, SPEC, teacher, settings, tmp_path / "x", progress=False, restart=True)
    assert all(torch.equal(load_file(str(tmp_path / "x" / "epoch_0000.safetensors"))[k], ref[k]) for k in ref)
