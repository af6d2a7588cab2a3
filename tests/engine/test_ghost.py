"""Ghost batch norm: one forward per step that normalises each micro-batch apart, equal to micro-batch forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvdd.config import Recipe
from cvdd.engine import fit
from cvdd.engine.ghost import ghost_batchnorm, grouped_batch_statistics
from cvdd.errors import ConfigError
from cvdd.models import create_model

CPU = torch.device("cpu")


def _pair(arch: str = "resnet8") -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = create_model(arch, 10, 32)
    b = create_model(arch, 10, 32)
    b.load_state_dict(a.state_dict())
    return a.train(), b.train()


@pytest.mark.parametrize("arch", ["resnet8", "convnet_d3_w32"])
def test_one_ghost_forward_equals_micro_batch_forwards(arch: str) -> None:
    """Loss, every gradient and the running statistics (updated once per micro-batch, in order) agree."""
    micro, sequential = _pair(arch)
    x, y = torch.randn(20, 3, 32, 32), torch.arange(20) % 10
    for part_x, part_y in zip(x.split(8), y.split(8)):  # 8 + 8 + 4 images, each loss weighted by its share
        (torch.nn.functional.cross_entropy(sequential(part_x), part_y) * len(part_x) / len(x)).backward()
    with ghost_batchnorm(micro, 8) as n:
        assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in micro.modules())
        torch.nn.functional.cross_entropy(micro(x), y).backward()
    for (name, pa), pb in zip(micro.named_parameters(), sequential.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name
    for (name, ba), bb in zip(micro.named_buffers(), sequential.buffers()):
        assert torch.allclose(ba.float(), bb.float(), rtol=1e-5, atol=1e-6), name
    assert all("forward" not in m.__dict__ for m in micro.modules())  # restored


def test_eval_mode_and_small_batches_run_plainly() -> None:
    model, _ = _pair()
    x = torch.randn(12, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with ghost_batchnorm(model, 4):
            assert torch.equal(model(x), plain)
    with pytest.raises(ValueError, match="group size"), ghost_batchnorm(model, 0):
        pass


def test_fit_with_ghost_bn_trains_like_micro_batches(digits) -> None:
    """The recipe switch: the same weights after two steps (up to rounding), one forward per step.

    Compared over two steps only: training this small network with 8-image BN groups is chaotic, a 1e-8
    perturbation of the initial weights grows to ~1e-3 within 20 steps (measured), ghost BN or not.
    """
    import dataclasses

    a, b = _pair()
    train = dataclasses.replace(digits.train, images=digits.train.images[:64], labels=digits.train.labels[:64])
    base = {"epochs": 1, "batch_size": 32, "micro_batch": 8, "lr": 0.01, "augment": "none", "nesterov": False}
    start = a.conv1.weight.detach().clone()
    fit(a, train, None, Recipe(**base), spec=digits.spec, device=CPU, progress=False)
    fit(b, train, None, Recipe(**base, ghost_bn=True), spec=digits.spec, device=CPU, progress=False)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert float((a.conv1.weight.detach() - start).abs().max()) > 1e-4  # it did train
    assert "ghost_bn" not in Recipe().identity() and Recipe(ghost_bn=True).identity()["ghost_bn"] is True
    with pytest.raises(ConfigError, match="ghost_bn and compile"):
        Recipe(ghost_bn=True, compile=True).validate()


def test_grouped_batch_statistics_equal_one_forward_per_group_and_touch_nothing() -> None:
    """Layers on batch statistics without tracking (a BSSL teacher's) normalise each group with its own statistics
    in one forward; running buffers stay as they were; layers on running statistics are left alone."""
    from cvdd.labels.bssl import bssl_mode

    torch.manual_seed(0)
    model = create_model("resnet8", 10, 32).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(22, 3, 32, 32) * 2 + 0.5  # groups of 8, 8 and 6
    with torch.no_grad(), bssl_mode(model):
        looped = torch.cat([model(part) for part in x.split(8)])
        with grouped_batch_statistics(model, 8) as n:
            fused = model(x)
            fused_nhwc = model(x.contiguous(memory_format=torch.channels_last))
    assert n == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(fused, looped, atol=1e-5) and torch.allclose(fused_nhwc, looped, atol=1e-5)
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # eval mode, running statistics: the layers run as usual
        plain = model(x)
        with grouped_batch_statistics(model, 8):
            assert torch.equal(model(x), plain)
    with pytest.raises(ValueError, match="group size"), grouped_batch_statistics(model, 0):
        pass


def test_grouped_statistics_in_bf16_round_once_like_the_fp32_reference() -> None:
    """bf16 activations with a large mean relative to their spread: x * scale and shift nearly cancel, so rounding
    scale and shift to bf16 first cost 0.48 here (32 times bf16's own rounding of the result); now only the result
    is rounded."""
    from cvdd.labels.bssl import bssl_mode

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = torch.nn.Sequential(bn).bfloat16()
    x = (torch.randn(16, 8, 4, 4) * 0.5 + 30).bfloat16()
    with bssl_mode(model), grouped_batch_statistics(model, 4):
        y = model(x).float()
    w, b = bn.weight.float(), bn.bias.float()
    ref = torch.cat([F.batch_norm(g.float(), None, None, w, b, True, 0.0, bn.eps) for g in x.split(4)])
    assert (y - ref).abs().max() <= (ref.bfloat16().float() - ref).abs().max() + 1e-6
