"""BN statistic matching: golden values, gradient, hygiene (no hooks left, running stats untouched)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cvdd.errors import ModelError
from cvdd.synthesis import BNMatching, BNStatHook


class ParallelBN(nn.Module):
    """Two BN layers fed the same input, so both layers' input statistics are known by hand."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.bn_a = nn.BatchNorm2d(channels)  # registered first: the "first BN" that gets the multiplier
        self.bn_b = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(x) + self.bn_b(x)


class ConvBN(nn.Module):
    """conv → BN → conv → BN, a tiny stand-in for an expert."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def _hand_case() -> tuple[ParallelBN, torch.Tensor]:
    """x of shape (2, 2, 1, 2): channel 0 holds 1, 3, 5, 7 and channel 1 holds 2, 2, 2, 2.

    Channel 0: mean 4, biased variance (9 + 1 + 1 + 9) / 4 = 5. Channel 1: mean 2, variance 0.
    bn_a running stats: mean (0, 0), var (1, 1) → ‖(4, 2)‖ + ‖(4, −1)‖ = √20 + √17.
    bn_b running stats: mean (4, 0), var (5, 3) → ‖(0, 2)‖ + ‖(0, −3)‖ = 2 + 3 = 5.
    """
    model = ParallelBN(2).eval()
    with torch.no_grad():
        model.bn_a.running_mean.copy_(torch.tensor([0.0, 0.0]))
        model.bn_a.running_var.copy_(torch.tensor([1.0, 1.0]))
        model.bn_b.running_mean.copy_(torch.tensor([4.0, 0.0]))
        model.bn_b.running_var.copy_(torch.tensor([5.0, 3.0]))
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]])
    return model, x


def test_loss_is_zero_when_running_stats_are_the_input_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model[0].running_mean.copy_(x.mean(dim=(0, 2, 3)))
        model[0].running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    for multiplier in (1.0, 10.0):
        with BNMatching(model, first_multiplier=multiplier) as bn:
            model(x)
            assert float(bn.loss()) == pytest.approx(0.0, abs=1e-5)


def test_unbiased_running_var_is_not_a_match() -> None:
    # Guards the "biased variance" choice: the unbiased estimate differs by n / (n - 1).
    model = nn.Sequential(nn.BatchNorm2d(1)).eval()
    x = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)  # mean 1, biased var 1, unbiased var 2
    with torch.no_grad():
        model[0].running_mean.fill_(1.0)
        model[0].running_var.fill_(2.0)
    with BNMatching(model, first_multiplier=1.0) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(1.0)


def test_hand_computed_value_with_first_layer_multiplier() -> None:
    model, x = _hand_case()
    first = math.sqrt(20) + math.sqrt(17)
    with BNMatching(model, first_multiplier=10.0) as bn:
        model(x)
        assert bn.names == ["bn_a", "bn_b"] and bn.multipliers == [10.0, 1.0]
        per_layer = [float(v) for v in bn.per_layer()]
        assert per_layer == pytest.approx([first, 5.0], rel=1e-6)
        assert float(bn.loss()) == pytest.approx(10 * first + 5.0, rel=1e-6)
    with BNStatHook(model, first_multiplier=1.0) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(first + 5.0, rel=1e-6)


def test_only_the_most_recent_forward_counts() -> None:
    model, x = _hand_case()
    with BNMatching(model) as bn:
        model(torch.randn(3, 2, 4, 4))
        model(x)
        assert float(bn.loss()) == pytest.approx(10 * (math.sqrt(20) + math.sqrt(17)) + 5.0, rel=1e-6)


def test_gradient_reaches_input_and_matches_finite_differences() -> None:
    model = ConvBN().double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def loss_of(inp: torch.Tensor) -> torch.Tensor:
        with BNMatching(model) as bn:
            model(inp)
            return bn.loss()

    loss_of(x).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # fast_mode checks one random projection of the Jacobian: enough to catch a wrong or missing path, in ms.
    assert torch.autograd.gradcheck(loss_of, (x.detach().requires_grad_(),), eps=1e-6, atol=1e-5, fast_mode=True)


def test_running_stats_untouched_and_hooks_removed() -> None:
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn2.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 6, 6, requires_grad=True)
    with BNMatching(model) as bn:
        model(x)
        bn.loss().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_removed_when_the_block_raises() -> None:
    model = ConvBN().eval()
    with pytest.raises(KeyError, match="boom"), BNMatching(model):
        assert model.bn1._forward_hooks and model.bn2._forward_hooks
        model(torch.randn(2, 3, 4, 4))
        raise KeyError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_statistics_are_fp32_under_autocast() -> None:
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), BNMatching(model) as bn:
        model(x)
        parts = bn.per_layer()
        loss = bn.loss()
    assert all(p.dtype == torch.float32 for p in parts) and loss.dtype == torch.float32
    # Same number as fp32 maths on the bf16 input the first BN actually saw.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.conv1(x)
    assert h.dtype == torch.bfloat16
    hf = h.detach().float()
    mu, var = hf.mean(dim=(0, 2, 3)), hf.var(dim=(0, 2, 3), unbiased=False)
    expected = (mu - model.bn1.running_mean).norm() + (var - model.bn1.running_var).norm()
    assert float(parts[0].detach()) == pytest.approx(float(expected), rel=1e-5)


def test_misuse_is_reported() -> None:
    model = ConvBN().eval()
    with BNMatching(model) as bn, pytest.raises(RuntimeError, match="bn1"):
        bn.loss()  # no forward yet
    with pytest.raises(ModelError, match="running statistics"):
        BNMatching(nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)))
    with BNMatching(nn.Sequential(nn.Conv2d(1, 1, 1))) as bn:
        assert float(bn.loss()) == 0.0 and bn.per_layer() == []


def test_channel_moments_gradient_is_exact() -> None:
    """The hand-written backward against autograd's, in fp64 (gradcheck) and for bf16 inputs."""
    from cvdd.synthesis.bn_matching import channel_moments

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: channel_moments(t), (x,))
    xb = (torch.randn(6, 3, 4, 4) * 2 + 1).to(torch.bfloat16).requires_grad_(True)
    mean, var = channel_moments(xb)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    (mean.sum() + (var * torch.arange(3.0)).sum()).backward()
    ref = xb.detach().float().requires_grad_(True)
    v, m = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
    (m.sum() + (v * torch.arange(3.0)).sum()).backward()
    assert xb.grad.dtype == torch.bfloat16
    assert torch.allclose(xb.grad.float(), ref.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("groups", [None, 2])
def test_compiled_moments_match_eager_and_keep_pytorchs_autograd_cache(groups: int | None) -> None:
    """Under torch.compile the moments are the plain expression (same values and gradient as the hand-written
    backward), so the compiled graph has no custom autograd Function and PyTorch's autograd cache can serve it."""
    from torch._dynamo.utils import counters

    from cvdd.synthesis.bn_matching import channel_moments

    def loss(t: torch.Tensor) -> torch.Tensor:
        mean, var = channel_moments(t.relu(), groups)
        return mean.square().sum() + (var * torch.arange(1.0, 4.0)).sum()

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (loss, torch.compile(loss, dynamic=False)):
        xi = x.clone().requires_grad_(True)
        value = fn(xi)
        value.backward()
        grads.append((value.detach(), xi.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert counters["aot_autograd"].get("autograd_cache_bypass", 0) == 0
    torch._dynamo.reset()


def test_grouped_moments_are_each_groups_own_with_exact_gradient() -> None:
    """channel_moments(x, G) equals the ungrouped moments of each of the G consecutive groups."""
    from cvdd.synthesis.bn_matching import channel_moments

    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mean, var = channel_moments(x, 3)
    assert mean.shape == var.shape == (3, 3)
    for g in range(3):
        m, v = channel_moments(x[2 * g : 2 * g + 2])
        assert torch.allclose(mean[g], m) and torch.allclose(var[g], v)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: channel_moments(t, 3), (xg,))
    xcl = x.contiguous(memory_format=torch.channels_last)  # a view of the batch split works in any memory format
    assert torch.allclose(channel_moments(xcl, 2)[1], channel_moments(x, 2)[1])
    with pytest.raises(ValueError, match="4 equal groups"):
        channel_moments(x, 4)


def test_grouped_loss_equals_weighted_sum_of_separate_forwards() -> None:
    """Σ_g w_g · loss(group g alone), in value and in gradient, from a single forward of the whole batch."""
    torch.manual_seed(0)
    model = ConvBN()
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 6, 6) * 2 + 0.5)  # running statistics away from the defaults
    model.eval()
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    model.double()
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)

    xa = x.clone().requires_grad_(True)
    with BNMatching(model, first_multiplier=10.0) as bn:
        bn.set_groups(w)
        model(xa)
        grouped = bn.loss()
    grouped.backward()

    xb = x.clone().requires_grad_(True)
    expected = xb.new_zeros(())
    with BNMatching(model, first_multiplier=10.0) as bn:
        for g in range(3):
            model(xb[2 * g : 2 * g + 2])
            expected = expected + w[g] * bn.loss()
    expected.backward()
    assert torch.allclose(grouped, expected, rtol=1e-12)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)

    with BNMatching(model) as bn:
        bn.set_groups(w)
        model(xa.detach())
        bn.set_groups(torch.ones(2, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="set_groups"):
            bn.loss()


def test_a_second_call_in_the_same_forward_is_ignored() -> None:
    """A BN layer that runs twice in one forward (a checkpointed block's recomputation) keeps its first statistics."""
    model, x = _hand_case()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out = self.inner(t)
            self.inner(torch.randn_like(t))  # a second call of the same layers within one forward
            return out

    with BNMatching(Twice()) as bn:
        bn.model(x)
        assert float(bn.loss()) == pytest.approx(10 * (math.sqrt(20) + math.sqrt(17)) + 5.0, rel=1e-6)


def test_reference_statistics_follow_running_updates_and_groups_are_checked() -> None:
    """In train mode each forward updates the running statistics: the loss compares with the current ones."""
    torch.manual_seed(0)
    model = ConvBN().train()
    x = torch.randn(4, 3, 5, 5)
    with BNMatching(model) as bn:
        model(x)
        first = float(bn.loss().detach())
        model(x * 3 + 1)
        model(x)
        model.eval()
        model(x)
        fresh = float(bn.loss().detach())
    with BNMatching(model) as bn:
        model(x)
        assert fresh == pytest.approx(float(bn.loss().detach()), rel=1e-6) and fresh != pytest.approx(first, rel=1e-3)
        bn.set_groups(torch.ones(2))  # groups asked for after an ungrouped forward: an error, not ignored weights
        with pytest.raises(RuntimeError, match="set_groups"):
            bn.loss()
