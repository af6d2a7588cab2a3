"""Recover's per-iteration augmentation, cosine schedule and pixel clamp."""

from __future__ import annotations

import pytest
import torch

from cvdd.errors import ConfigError
from cvdd.synthesis import clamp_to_valid, cosine_lr, recover_augment


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct(b: int = 2, size: int = 8) -> torch.Tensor:
    """(b, 3, size, size) with every pixel distinct, so a roll or flip is identifiable."""
    return torch.arange(b * 3 * size * size, dtype=torch.float32).view(b, 3, size, size)


def _find_transform(out: torch.Tensor, x: torch.Tensor, jitter: int) -> tuple[bool, int, int] | None:
    """The (flip, off_h, off_w) with off_* in {0..jitter} that maps x to out, if any."""
    for flip in (False, True):
        base = x.flip(3) if flip else x
        for dy in range(jitter + 1):
            for dx in range(jitter + 1):
                if torch.allclose(out, torch.roll(base, (dy, dx), (2, 3)), atol=1e-3):
                    return flip, dy, dx
    return None


def test_shape_determinism_and_gradient() -> None:
    x = torch.randn(4, 3, 16, 16, generator=_gen(0), requires_grad=True)
    a = recover_augment(x, _gen(1), 16, 4)
    b = recover_augment(x, _gen(1), 16, 4)
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, recover_augment(x, _gen(2), 16, 4))
    a.square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert recover_augment(x, _gen(1), 8, 2, shared_crop=False).shape == (4, 3, 8, 8)


def test_full_box_without_jitter_is_identity_up_to_flip() -> None:
    # scale (1, 1) forces the whole-image box (no 3/4..4/3 aspect fits at area 1 except exactly 1, so the
    # sampler falls back to the full image); same-size roi_align of the full box samples pixel centres.
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    seen = set()
    for seed in range(8):
        out = recover_augment(x, _gen(seed), 8, 0, scale=(1.0, 1.0))
        match = _find_transform(out, x, 0)
        assert match is not None
        seen.add(match[0])
    assert seen == {False, True}  # both flip outcomes occur


def test_roll_offsets_cover_zero_to_jitter_inclusive() -> None:
    x = _distinct()
    offsets = set()
    for seed in range(40):
        match = _find_transform(recover_augment(x, _gen(seed), 8, 2, scale=(1.0, 1.0)), x, 2)
        assert match is not None  # never outside {0, 1, 2}, never negative
        offsets.add(match[1:])
    assert {dy for dy, _ in offsets} == {0, 1, 2} and {dx for _, dx in offsets} == {0, 1, 2}


def test_jitter_generator_draws_the_offsets() -> None:
    x = _distinct()
    a = recover_augment(x, _gen(0), 8, 3, scale=(1.0, 1.0), jitter_generator=_gen(9))
    b = recover_augment(x, _gen(1), 8, 3, scale=(1.0, 1.0), jitter_generator=_gen(9))
    ta, tb = _find_transform(a, x, 3), _find_transform(b, x, 3)
    assert ta is not None and tb is not None and ta[1:] == tb[1:]


def test_shared_crop_treats_the_batch_alike_per_image_does_not() -> None:
    x = torch.randn(1, 3, 16, 16, generator=_gen(0)).expand(6, 3, 16, 16).contiguous()
    shared = recover_augment(x, _gen(3), 16, 4)
    assert all(torch.equal(shared[0], shared[i]) for i in range(6))
    per_image = recover_augment(x, _gen(3), 16, 4, shared_crop=False)
    assert any(not torch.allclose(per_image[0], per_image[i]) for i in range(1, 6))


def test_invalid_options() -> None:
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="jitter"):
        recover_augment(x, _gen(0), 8, -1)
    with pytest.raises(ConfigError, match="crop scale"):
        recover_augment(x, _gen(0), 8, 0, scale=(0.5, 0.1))


def test_cosine_lr() -> None:
    assert cosine_lr(0, 4000, 0.25) == pytest.approx(0.25)
    assert cosine_lr(2000, 4000, 0.25) == pytest.approx(0.125)
    assert cosine_lr(4000, 4000, 0.25) == pytest.approx(0.0, abs=1e-12)
    assert 0 < cosine_lr(3999, 4000, 0.25) < 1e-6
    with pytest.raises(ValueError, match="positive"):
        cosine_lr(0, 0, 0.1)


def test_clamp_to_valid_bounds_in_place() -> None:
    mean = torch.tensor([0.4914, 0.4822, 0.4465])
    std = torch.tensor([0.2470, 0.2435, 0.2616])
    x = (torch.randn(5, 3, 4, 4, generator=_gen(0)) * 10).requires_grad_()
    inside = torch.full((1, 3, 1, 1), 0.1)
    before = torch.cat([x.detach(), inside.expand(1, 3, 4, 4)])
    y = torch.cat([x.detach(), inside.expand(1, 3, 4, 4)])
    assert clamp_to_valid(y, mean, std) is y
    pixels = y * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    # Both bounds are reached (the input overshoots both ways) and in-range values are untouched.
    lo, hi = -mean / std, (1 - mean) / std
    assert torch.allclose(y[:5].amin(dim=(0, 2, 3)), lo) and torch.allclose(y[:5].amax(dim=(0, 2, 3)), hi)
    assert torch.equal(y[5:], before[5:])
    # Works in place on a leaf that requires grad (the tensor Adam optimises), with (1, C, 1, 1) stats too.
    clamp_to_valid(x, mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1))
    assert x.requires_grad and x.grad_fn is None and torch.allclose(x.detach(), y[:5])
