from __future__ import annotations

import pytest
import torch

from cvdd.errors import ConfigError
from cvdd.evaluation import EvalConfig, evaluate_synthetic, random_real_set


def test_random_real_set_is_balanced_seeded_and_in_range(digits) -> None:
    a, la = random_real_set(digits, 3, seed=1)
    b, _ = random_real_set(digits, 3, seed=1)
    c, _ = random_real_set(digits, 3, seed=2)
    assert a.shape == (30, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert la.tolist() == [k for k in range(10) for _ in range(3)]
    assert a.dtype == torch.uint8  # as the real images are: a float32 copy would be 4x larger


def test_a_uint8_set_trains_exactly_like_its_float_copy(digits) -> None:
    """A uint8 set stays uint8 on the device, and its students, batches and checkpoint identity are those of its
    float32 copy (x / 255): only the rows of a batch become floats."""
    from cvdd.evaluation.student import EvalJob, _prepare

    u8, labels = random_real_set(digits, 2, seed=0)
    f32 = u8.float() / 255
    cfg = EvalConfig(student="convnet_d3_w32", epochs=2, batch_size=8, label_mode="hard", seeds=[0])
    a, b = (_prepare(EvalJob(x, labels, cfg), digits.spec, torch.device("cpu"), False, {}) for x in (u8, f32))
    assert a.source.images.dtype == torch.uint8 and b.source.images.dtype == torch.float32
    assert a.identity == b.identity  # a checkpoint of one resumes the other
    ga, gb = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for x, y in zip(a.source.epoch(0, ga), b.source.epoch(0, gb)):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.labels, y.labels)
    accs = [evaluate_synthetic(x, labels, digits.spec, digits.test, cfg).accs for x in (u8, f32)]
    assert accs[0] == accs[1]


def test_hard_label_students_learn_from_real_images(digits) -> None:
    images, labels = random_real_set(digits, 10, seed=0)
    cfg = EvalConfig(
        student="convnet_d3_w32", epochs=15, batch_size=16, micro_batch=8, lr=0.003, label_mode="hard", seeds=[0, 1]
    )
    res = evaluate_synthetic(images, labels, digits.spec, digits.test, cfg)
    assert len(res.accs) == 2 and res.mean > 0.4 and res.std >= 0.0 and res.seconds > 0


def test_soft_labels_need_a_teacher(digits) -> None:
    images, labels = random_real_set(digits, 1, seed=0)
    with pytest.raises(ConfigError, match="needs a teacher"):
        evaluate_synthetic(images, labels, digits.spec, digits.test, EvalConfig(student="convnet_d3_w32", epochs=1))
    with pytest.raises(ConfigError, match="unknown label mode"):
        EvalConfig(label_mode="magic").validate()
    with pytest.raises(ConfigError, match="checkpoint_every_s"):  # a training field, refused before any work
        EvalConfig(checkpoint_every_s=-1).validate()


def test_student_checkpoints_resume_only_under_the_same_evaluation_fields(digits, tmp_path, caplog) -> None:
    """A checkpoint left by a killed evaluation is not resumed after a field that shapes training changed."""
    images, labels = random_real_set(digits, 1, seed=0)
    base = {"student": "convnet_d3_w32", "epochs": 2, "label_mode": "hard", "seeds": [0]}
    ckpt = tmp_path / "students"
    evaluate_synthetic(images, labels, digits.spec, digits.test, EvalConfig(**base), checkpoint_dir=ckpt)
    assert (ckpt / "student-seed0.pt").is_file()  # kept until the caller has its result
    with caplog.at_level("INFO", logger="cvdd.engine.loop"):
        # How often checkpoints are written is no part of the evaluation: another interval still resumes.
        every_epoch = EvalConfig(**base, checkpoint_every_s=0)
        assert every_epoch.recipe().checkpoint_every_s == 0 and every_epoch.identity() == EvalConfig(**base).identity()
        evaluate_synthetic(images, labels, digits.spec, digits.test, every_epoch, checkpoint_dir=ckpt)
        assert any("resuming from epoch 2" in r.getMessage() for r in caplog.records)
        caplog.clear()
        changed = EvalConfig(**base, cutmix=False)
        evaluate_synthetic(images, labels, digits.spec, digits.test, changed, checkpoint_dir=ckpt)
        assert any("ignoring checkpoint" in r.getMessage() for r in caplog.records)


def test_jobs_of_one_set_share_its_device_copy(digits) -> None:
    """Soft- and hard-label jobs of one set hold one device copy of its pixels, not one each."""
    from cvdd.evaluation.student import EvalJob, _prepare

    images, labels = random_real_set(digits, 1, seed=0)
    cfg = EvalConfig(student="convnet_d3_w32", epochs=1, label_mode="hard", seeds=[0])
    cache: dict = {}
    a = _prepare(EvalJob(images, labels, cfg), digits.spec, torch.device("cpu"), False, cache)
    b = _prepare(EvalJob(images, labels, cfg), digits.spec, torch.device("cpu"), False, cache)
    other, _ = random_real_set(digits, 1, seed=1)
    c = _prepare(EvalJob(other, labels, cfg), digits.spec, torch.device("cpu"), False, cache)
    assert a.source.images.data_ptr() == b.source.images.data_ptr() != c.source.images.data_ptr()
    assert len(cache) == 2
