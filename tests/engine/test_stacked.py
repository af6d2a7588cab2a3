"""Stacked students: k seeds' students trained as one vectorised model equal k separate runs."""

from __future__ import annotations

import pytest
import torch

from cvdd.config import Recipe
from cvdd.engine import fit, stacked
from cvdd.engine.stacked import StackedModels, fit_stacked
from cvdd.errors import ConfigError
from cvdd.evaluation import EvalConfig, evaluate_synthetic, random_real_set
from cvdd.evaluation.student import SyntheticBatches
from cvdd.models import create_model

CPU = torch.device("cpu")


def _students(arch: str, seeds: list[int]) -> list[torch.nn.Module]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(create_model(arch, 10, 32))
    return out


@pytest.mark.parametrize("arch", ["resnet8", "convnet_d3_w32"])
def test_stacked_forward_backward_and_running_stats_equal_the_members(arch: str) -> None:
    members, copies = _students(arch, [0, 1, 2]), _students(arch, [0, 1, 2])
    stack = StackedModels(members).train()
    x = torch.randn(3, 6, 3, 32, 32)
    out = stack(x)
    assert out.shape == (3, 6, 10)
    ref = torch.stack([m.train()(xi) for m, xi in zip(copies, x)])
    assert torch.allclose(out, ref, atol=1e-5)
    (out * torch.arange(10.0)).sum().backward()
    (ref * torch.arange(10.0)).sum().backward()
    for i, m in enumerate(copies):
        for (name, p), sp in zip(m.named_parameters(), stack.params):
            assert torch.allclose(sp.grad[i], p.grad, rtol=1e-4, atol=1e-5), (i, name)
    written = stack.write_back()
    for a, b in zip(written, copies):  # running statistics (one update each) land in the members
        for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
            assert torch.allclose(ba.float(), bb.float(), atol=1e-6), name
    shared = stack(x[0], shared=True)  # one input for every member
    assert shared.shape == (3, 6, 10)


def _sources(digits, cfg: EvalConfig) -> SyntheticBatches:
    images, labels = random_real_set(digits, 2, seed=0)
    return SyntheticBatches(images, labels, digits.spec, cfg, CPU)


@pytest.mark.parametrize(("arch", "ghost"), [("convnet_d3_w32", False), ("convnet_d3_w32", True), ("resnet8", False)])
def test_fit_stacked_trains_the_students_of_separate_runs(digits, arch: str, ghost: bool) -> None:
    """Two steps of three seeds (own plans, own inits, AdamW without decay on BN): the same weights.

    Compared over two steps: 8-image BN training is chaotic, rounding differences grow over many steps
    (tests/engine/test_ghost.py measured that). Adam normalises each element's step, so an element whose
    gradient is at rounding level can move by a whole learning rate either way (measured: resnet8, 5e-5 on one
    weight out of 1.5e-3 moved); the weights are therefore compared by their mean difference against how far
    they moved. Measured worst ratios: 4e-6 on the CPU of earlier sessions; on a 2-core AVX2 AMD EPYC, 1.6e-5 for
    convnet_d3_w32 but 1.3e-2 for resnet8 (layer1.0: about 1% of a conv's elements took a whole step the other
    way, and its BN weights, whose gradients are sums that nearly cancel over 5-image micro-batches, differed by
    about 1% of their movement), the same with and without the fused optimiser step. A real stacking error (a
    seed's plan, initialisation or BN groups given to another student) moves weights by the order of their whole
    movement, far above the 3e-2 bound.
    """
    seeds = [0, 1, 2]
    cfg = EvalConfig(student=arch, epochs=1, batch_size=10, micro_batch=5, label_mode="hard", seeds=seeds)
    recipe = cfg.recipe()
    recipe.ghost_bn = ghost
    recipe.channels_last = False  # the stack runs NCHW; the separate runs too, so that only stacking differs
    source = _sources(digits, cfg)  # 20 images: 2 steps of 10, 2 micro-batches each
    separate = _students(arch, seeds)
    for model, seed in zip(separate, seeds):
        fit(model, source, None, recipe, spec=digits.spec, device=CPU, seed=seed, progress=False)
    stacked, start = _students(arch, seeds), _students(arch, seeds)
    results = fit_stacked(
        stacked, [source] * 3, digits.test, recipe, spec=digits.spec, device=CPU, seeds=seeds, progress=False
    )
    for a, b, c in zip(separate, stacked, start):
        for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), c.parameters()):
            pa, pb, p0 = pa.detach(), pb.detach(), p0.detach()
            moved = float((pa - p0).abs().mean())
            assert moved > 1e-6 and float((pa - pb).abs().mean()) <= 3e-2 * moved, name
        for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
            # Running statistics follow the weights of the first step (resnet8 on the AVX2 machine: up to 2e-4).
            assert torch.allclose(ba.float(), bb.float(), atol=1e-3), name
    assert [len(r.history) for r in results] == [1, 1, 1] and all(0 <= r.test_acc <= 1 for r in results)


def test_stacked_checkpoint_resumes_and_belongs_to_its_seeds(digits, tmp_path) -> None:
    seeds = [3, 4]
    cfg = EvalConfig(student="convnet_d3_w32", epochs=2, batch_size=10, micro_batch=5, label_mode="hard", seeds=seeds)
    source, ckpt = _sources(digits, cfg), str(tmp_path / "stack.pt")
    kw = {"spec": digits.spec, "device": CPU, "progress": False, "checkpoint": ckpt}
    first = fit_stacked(_students("convnet_d3_w32", seeds), [source] * 2, digits.test, cfg.recipe(), seeds=seeds, **kw)
    again = fit_stacked(_students("convnet_d3_w32", seeds), [source] * 2, digits.test, cfg.recipe(), seeds=seeds, **kw)
    assert [r.resumed_from for r in again] == [2, 2]  # nothing left to train: the finished state is restored
    assert [r.test_acc for r in again] == [r.test_acc for r in first]
    other = fit_stacked(_students("convnet_d3_w32", [3, 5]), [source] * 2, None, cfg.recipe(), seeds=[3, 5], **kw)
    assert [r.resumed_from for r in other] == [0, 0]  # another seed list: its checkpoint is not resumed


def test_evaluate_with_stack_seeds_matches_sequential_students(digits) -> None:
    """The evaluation switch on real images: per-seed accuracies within rounding of the sequential students."""
    images, labels = random_real_set(digits, 2, seed=0)
    base = {"student": "convnet_d3_w32", "epochs": 2, "batch_size": 10, "micro_batch": 5, "label_mode": "hard"}
    plain = evaluate_synthetic(images, labels, digits.spec, digits.test, EvalConfig(**base, seeds=[0, 1]))
    stack = evaluate_synthetic(
        images, labels, digits.spec, digits.test, EvalConfig(**base, seeds=[0, 1], stack_seeds=True)
    )
    assert stack.seeds == [0, 1] and len(stack.accs) == 2
    assert max(abs(a - b) for a, b in zip(plain.accs, stack.accs)) <= 0.01
    assert "stack_seeds" not in EvalConfig().identity() and EvalConfig(stack_seeds=True).identity()["stack_seeds"]


def test_stacking_refuses_mixed_architectures_and_compile(digits) -> None:
    with pytest.raises(ConfigError, match="one architecture"):
        StackedModels([create_model("resnet8", 10, 32), create_model("convnet_d3_w32", 10, 32)])
    with pytest.raises(ConfigError, match="stack_seeds and compile"):
        EvalConfig(stack_seeds=True, compile=True).validate()
    with pytest.raises(ConfigError, match="cannot be compiled"):
        fit_stacked(
            _students("convnet_d3_w32", [0]),
            [],
            None,
            Recipe(compile=True),
            spec=digits.spec,
            device=CPU,
            seeds=[0],
        )


def test_stacked_students_train_under_bf16_autocast_with_stored_style_shared_batches(digits) -> None:
    """One source shared by every member (as stored labels are) and bf16 autocast: finite, learning students."""
    images, labels = random_real_set(digits, 10, seed=0)
    cfg = EvalConfig(student="convnet_d3_w32", epochs=15, label_mode="hard", seeds=[0, 1], precision="bf16", lr=0.003)
    source = SyntheticBatches(images, labels, digits.spec, cfg, CPU)
    runs = fit_stacked(
        _students("convnet_d3_w32", [0, 1]),
        source,
        digits.test,
        cfg.recipe(),
        spec=digits.spec,
        device=CPU,
        seeds=[0, 1],
        progress=False,
    )
    assert all(r.test_acc > 0.4 for r in runs)  # ten classes: chance is 0.1
    assert runs[0].history[-1]["train_loss"] < runs[0].history[0]["train_loss"]


def test_stacked_batchnorm_runs_in_fp32_under_bf16_autocast(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 the stack's BN layers get fp32 inputs: CUDA's vmapped batch-norm backward refuses bf16 inputs
    with fp32 running statistics ("Expected running_mean to have type BFloat16", seen on an H200).

    CPU autocast does not reach inside ``vmap`` (a stacked forward stays fp32 here), so the patch is checked on
    a plain model, where CPU autocast does feed BN a bf16 input, and its use by ``fit_stacked`` is checked apart.
    """
    seen: list[torch.dtype] = []
    original = torch.nn.functional.batch_norm

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(x.dtype)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", spy)
    model = _students("resnet8", [0])[0]
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        assert set(seen) == {torch.bfloat16}
        seen.clear()
        with stacked.fp32_batchnorm(model) as n:
            out = model(x)
        bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert n == bns > 0 and set(seen) == {torch.float32} and out.dtype == torch.bfloat16  # the head still in bf16
        seen.clear()
        model(x)  # restored on exit
        assert set(seen) == {torch.bfloat16}

    entered: list[str] = []
    real = stacked.fp32_batchnorm

    def counting(m: torch.nn.Module):
        entered.append(type(m).__name__)
        return real(m)

    monkeypatch.setattr(stacked, "fp32_batchnorm", counting)
    images, labels = random_real_set(digits, 2, seed=0)
    for precision in ("bf16", "fp32"):
        cfg = EvalConfig(student="resnet8", epochs=1, label_mode="hard", seeds=[0, 1], precision=precision)
        fit_stacked(
            _students("resnet8", [0, 1]),
            SyntheticBatches(images, labels, digits.spec, cfg, CPU),
            None,
            cfg.recipe(),
            spec=digits.spec,
            device=CPU,
            seeds=[0, 1],
            progress=False,
        )
    assert entered == ["CifarResNet"]  # once, for the bf16 run's template


def test_evaluate_many_stacks_compatible_jobs_only(digits, caplog: pytest.LogCaptureFixture) -> None:
    """Two sets with one recipe share a stack (2 x 2 students); a job with another student trains on its own."""
    from cvdd.evaluation import EvalJob, evaluate_many

    (a, la), (b, lb) = random_real_set(digits, 2, seed=0), random_real_set(digits, 2, seed=1)
    base = {"epochs": 3, "batch_size": 10, "micro_batch": 5, "label_mode": "hard", "seeds": [0, 1]}
    stack_cfg = EvalConfig(student="convnet_d3_w32", stack_seeds=True, **base)
    other = EvalConfig(student="resnet8", stack_seeds=True, **{**base, "seeds": [0]})
    jobs = [EvalJob(a, la, stack_cfg), EvalJob(b, lb, stack_cfg), EvalJob(a, la, other)]
    with caplog.at_level("INFO", logger="cvdd.engine.stacked"):
        together = evaluate_many(jobs, digits.spec, digits.test)
    assert sum("for 4 members" in r.getMessage() for r in caplog.records) == 3  # one stack, 3 epochs
    assert not any("for 1 members" in r.getMessage() for r in caplog.records)  # a lone student is not stacked
    alone = [evaluate_synthetic(j.images, j.labels, digits.spec, digits.test, j.cfg) for j in jobs]
    for t, s in zip(together, alone):
        assert t.seeds == s.seeds and max(abs(x - y) for x, y in zip(t.accs, s.accs)) <= 0.02
    assert together[0].seconds == pytest.approx(together[1].seconds)  # the stack's wall time, shared by students


def test_member_losses_batch_equal_objectives_and_match_one_by_one() -> None:
    """Per-row batching of CE (with CutMix) and stored-label KD gives each member's own loss and gradient."""
    from cvdd.engine.loop import Batch, hard_label_loss
    from cvdd.engine.stacked import member_losses
    from cvdd.evaluation.student import kd_loss

    gen = torch.Generator().manual_seed(0)
    k, m, c = 5, 4, 10

    def batch(soft: bool) -> Batch:
        y = torch.randint(0, c, (m,), generator=gen)
        y2, lam = torch.randint(0, c, (m,), generator=gen), torch.rand(m, generator=gen)
        logits = torch.randn(m, c, generator=gen) if soft else None
        return Batch(torch.randn(m, 3, 8, 8, generator=gen), y, logits, y2, lam)

    calls = []

    def teacher(x: torch.Tensor) -> torch.Tensor:  # an online teacher: must be asked once per member
        calls.append(len(x))
        return x.flatten(1)[:, :c]

    # Objectives made apart but equal (as evaluate_many's jobs make them), one other temperature, one online.
    objs = [hard_label_loss(0.1), kd_loss(4.0, None), hard_label_loss(0.1), kd_loss(4.0, None), kd_loss(2.0, teacher)]
    members = [batch(False), batch(True), batch(False), batch(True), batch(False)]
    logits = torch.randn(k, m, c, generator=gen, requires_grad=True)
    got = member_losses(logits, members, objs)
    (got * torch.arange(1.0, k + 1)).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    want = torch.stack([o(logits[j], members[j]) for j, o in enumerate(objs)])
    (want * torch.arange(1.0, k + 1)).sum().backward()
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(grad, logits.grad, atol=1e-6)
    assert calls == [m, m]  # the online member was scored alone, once in each computation
