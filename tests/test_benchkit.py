"""The speed suite's model timers: forward and backward spans from hooks, counted per training forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvdd.benchkit import ModelTimer


def _steps(model: nn.Module, device: torch.device, n: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 3, 16, 16, device=device)).square().mean().backward()
        opt.step()


def _model(device: torch.device) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)).to(device)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_timer_counts_training_forwards_and_times_both_passes(device: str) -> None:
    dev = torch.device(device)
    model = _model(dev)
    model(torch.randn(2, 3, 16, 16, device=dev))  # materialise the lazy layer outside the timer
    with ModelTimer([model], dev) as timer:
        _steps(model, dev)
        model.eval()
        with torch.no_grad():
            model(torch.randn(4, 3, 16, 16, device=dev))  # an evaluation forward: not counted (train_only)
    assert timer.forwards == 3 and timer.images == 24
    assert timer.forward_s > 0 and timer.backward_s > 0
    assert not model._forward_hooks and not model._forward_pre_hooks  # hooks removed on exit
