"""Activation checkpointing of experts' blocks: same loss and pixel gradients, fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from cvdd.models import checkpoint_blocks_of, checkpointed, create_model
from cvdd.synthesis.bn_matching import BNMatching


def _loss_and_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    xg = x.clone().requires_grad_(True)
    # The backward runs inside the hooks' context, as in recover: the recomputation must replay the hooks too.
    with BNMatching(model, first_multiplier=10.0) as bn:
        loss = torch.nn.functional.cross_entropy(model(xg), y) + 0.01 * bn.loss()
        loss.backward()
    return float(loss.detach()), xg.grad


@pytest.mark.parametrize(("arch", "blocks"), [("resnet18", 8), ("mobilenetv2", 17), ("densenet121", 58)])
def test_checkpointed_blocks_give_the_same_loss_and_gradient(arch: str, blocks: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 10, 32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    plain_loss, plain_grad = _loss_and_grad(model, x, y)
    with checkpointed(model) as n:
        assert n == blocks == len(checkpoint_blocks_of(model))
        loss, grad = _loss_and_grad(model, x, y)
        with torch.no_grad():  # no graph: the blocks run plainly
            assert torch.equal(model(x), model(x))
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert torch.allclose(grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert all("forward" not in b.__dict__ for b in checkpoint_blocks_of(model))  # restored


def test_checkpointing_saves_activation_memory() -> None:
    """The autograd graph keeps fewer bytes of saved tensors when the blocks are checkpointed."""
    model = create_model("resnet18", 10, 32).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def saved_bytes() -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randn(8, 3, 32, 32, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total

    plain = saved_bytes()
    with checkpointed(model):
        ckpt = saved_bytes()
    assert ckpt < plain / 3


def test_forwards_restored_when_the_block_raises() -> None:
    model = create_model("resnet18", 10, 32).eval()
    with pytest.raises(RuntimeError, match="inside"), checkpointed(model):
        raise RuntimeError("inside")
    assert all("forward" not in b.__dict__ for b in checkpoint_blocks_of(model))
    assert checkpoint_blocks_of(create_model("convnet_d3_w32", 10, 32)) == []  # no blocks: runs plainly


def test_recomputation_does_not_replace_the_recorded_statistics() -> None:
    """The backward's recomputation runs the BN hooks again; what they compute then is dropped, not kept alive."""
    model = create_model("resnet18", 10, 32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    with BNMatching(model) as bn, checkpointed(model):
        loss = model(x).sum() + bn.loss()
        before = [id(st[0]) for st in bn._stats]
        loss.backward()
        assert [id(st[0]) for st in bn._stats] == before
