"""Golden values for the maths of recover: BN matching, voter weights, committee policies, augmentation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cvdd.distill.bn_matching import BNMatching
from cvdd.distill.committee import select_committee
from cvdd.distill.jitter import clamp_to_valid, cosine_lr, recover_augment
from cvdd.distill.voting import voter_weights
from cvdd.errors import ConfigError


class _TwoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn1(x)))


def test_bn_loss_is_zero_when_batch_stats_equal_running_stats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    x = torch.randn(4, 3, 5, 5)
    model[0].running_mean.copy_(x.mean(dim=(0, 2, 3)))
    model[0].running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    with BNMatching(model, first_multiplier=10.0) as bn:
        model(x)
        assert float(bn.loss()) == pytest.approx(0.0, abs=1e-6)


def test_bn_loss_hand_computed_with_first_layer_multiplier() -> None:
    model = _TwoBN().eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model.bn1.running_mean.zero_()
        model.bn1.running_var.fill_(1.0)
        # bn1 in eval mode with these stats (weight 1, bias 0) is the identity up to eps.
        model.bn2.running_mean.copy_(torch.tensor([1.0, 0.0]))
        model.bn2.running_var.copy_(torch.tensor([1.0, 1.0]))
    # Channel 0 takes values {0, 2} (mean 1, biased var 1); channel 1 takes {3, 3} (mean 3, var 0).
    x = torch.tensor([[[[0.0]], [[3.0]]], [[[2.0]], [[3.0]]]])
    with BNMatching(model, first_multiplier=10.0) as bn:
        model(x)
        per_layer = bn.per_layer()
        # bn1: mean (1, 3) vs (0, 0) -> sqrt(10); var (1, 0) vs (1, 1) -> 1.
        assert float(per_layer[0]) == pytest.approx(math.sqrt(10) + 1, rel=1e-5)
        # bn2 input = bn1(x) = x / sqrt(1 + eps): mean ≈ (1, 3) vs (1, 0) -> 3; var ≈ (1, 0) vs (1, 1) -> 1.
        assert float(per_layer[1]) == pytest.approx(3 + 1, rel=1e-4)
        assert float(bn.loss()) == pytest.approx(10 * (math.sqrt(10) + 1) + 4, rel=1e-4)


def test_bn_hooks_removed_stats_untouched_and_gradient_reaches_input() -> None:
    torch.manual_seed(0)
    model = _TwoBN().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    with BNMatching(model) as bn:
        model(x)
        bn.loss().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), BNMatching(model):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_prior_weights_match_the_paper_table() -> None:
    w = voter_weights([63.0, 65.3], "prior", 5.0)  # CIFAR-10 R18 + R50
    assert [round(float(v), 3) for v in w] == [0.387, 0.613]
    w = voter_weights([46.5, 28.3], "prior", 5.0)  # Tiny R18 + R50
    assert [round(float(v), 3) for v in w] == [0.974, 0.026]
    relabel = voter_weights([63, 65.3, 68.5, 67.6, 67.4], "prior", 10.0)  # CIFAR-10 relabel committee
    assert [round(float(v), 3) for v in relabel] == [0.14, 0.177, 0.243, 0.222, 0.218]
    assert float(w.sum()) == pytest.approx(1.0)


def test_equal_and_random_weights() -> None:
    assert voter_weights([1, 2, 3], "equal").tolist() == pytest.approx([1 / 3] * 3)
    a = voter_weights([1, 2, 3], "random", generator=torch.Generator().manual_seed(4))
    b = voter_weights([1, 2, 3], "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and float(a.sum()) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="unknown voting"):
        voter_weights([1], "majority")
    with pytest.raises(ConfigError, match="temperature"):
        voter_weights([1, 2], "prior", 0.0)


PAPER_POOL = ["R18", "R50", "SV2", "MBV2", "D121"]
PAPER_PAIRS = [
    ("R18", "R50"),
    ("R18", "SV2"),
    ("R18", "MBV2"),
    ("R18", "D121"),
    ("R50", "SV2"),
    ("R50", "MBV2"),
    ("R50", "D121"),
    ("SV2", "MBV2"),
    ("SV2", "D121"),
    ("MBV2", "D121"),
]


def test_pairs_policy_enumerates_the_paper_list_and_wraps() -> None:
    got = [tuple(select_committee(PAPER_POOL, "pairs", k, 2)) for k in range(10)]
    assert got == PAPER_PAIRS
    assert tuple(select_committee(PAPER_POOL, "pairs", 10, 2)) == PAPER_PAIRS[0]
    assert len({tuple(select_committee(PAPER_POOL, "pairs", k, 3)) for k in range(10)}) == 10


def test_random_single_fixed_policies_and_errors() -> None:
    a = [select_committee(PAPER_POOL, "random", k, 2, seed=3) for k in range(8)]
    b = [select_committee(PAPER_POOL, "random", k, 2, seed=3) for k in reversed(range(8))][::-1]
    assert a == b and len({tuple(x) for x in a}) > 1 and all(len(set(x)) == 2 for x in a)
    assert select_committee(PAPER_POOL, "single", 5) == ["R18"]
    assert select_committee(PAPER_POOL, "single", 5, single="D121") == ["D121"]
    assert select_committee(PAPER_POOL, "fixed", 0, fixed=["SV2", "R50"]) == ["SV2", "R50"]
    with pytest.raises(ConfigError, match="committee size 3 is larger than the pool of 2 experts: a, b"):
        select_committee(["a", "b"], "random", 0, 3)
    with pytest.raises(ConfigError, match="unknown committee policy"):
        select_committee(PAPER_POOL, "setting5", 0)
    with pytest.raises(ConfigError, match="not in the pool"):
        select_committee(PAPER_POOL, "fixed", 0, fixed=["VGG"])


def test_recover_augment_is_seeded_differentiable_and_shaped() -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    a = recover_augment(x, torch.Generator().manual_seed(1), 16, 4)
    b = recover_augment(x, torch.Generator().manual_seed(1), 16, 4)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    per_image = recover_augment(x, torch.Generator().manual_seed(1), 8, 0, shared_crop=False)
    assert per_image.shape == (4, 3, 8, 8)


def test_full_crop_no_jitter_is_identity_up_to_flip() -> None:
    x = torch.randn(2, 3, 8, 8)
    out = recover_augment(x, torch.Generator().manual_seed(0), 8, 0, scale=(1.0, 1.0))
    assert torch.allclose(out, x, atol=1e-5) or torch.allclose(out, x.flip(3), atol=1e-5)


def test_cosine_lr_and_clamp() -> None:
    assert cosine_lr(0, 100, 0.25) == pytest.approx(0.25)
    assert cosine_lr(50, 100, 0.25) == pytest.approx(0.125)
    assert cosine_lr(100, 100, 0.25) == pytest.approx(0.0)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    x = torch.randn(5, 3, 4, 4) * 10
    clamp_to_valid(x, mean, std)
    pixels = x * std + mean
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
