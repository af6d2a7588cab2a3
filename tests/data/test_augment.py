from __future__ import annotations

import torch

from cvdd.data.augment import Normalize, TrainAugment, crop_resize, random_crop, random_flip, random_resized_crop_boxes
from cvdd.data.specs import DatasetSpec

SPEC = DatasetSpec("t", ("a", "b"), 8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_takes_a_window_of_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = random_crop(x, 2, _gen())
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, oy : oy + 6, ox : ox + 6] for oy in range(5) for ox in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop(x, 0, _gen()), x)
    assert torch.equal(random_crop(x, 2, _gen(5)), random_crop(x, 2, _gen(5)))


def test_random_crop_works_on_uint8() -> None:
    x = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    assert random_crop(x, 4, _gen()).dtype == torch.uint8


def test_flip_flips_some_and_keeps_others() -> None:
    x = torch.arange(64 * 4, dtype=torch.float32).view(64, 1, 1, 4)
    out = random_flip(x, _gen())
    flipped = (out == x.flip(3)).all(dim=(1, 2, 3))
    kept = (out == x).all(dim=(1, 2, 3))
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_rrc_boxes_are_valid_fractions() -> None:
    boxes = random_resized_crop_boxes(500, _gen(), torch.device("cpu"), scale=(0.08, 1.0))
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all())
    area = h * w
    assert bool((area >= 0.08 - 1e-6).all() and (area <= 1 + 1e-6).all())


def test_crop_resize_golden() -> None:
    # Left half ones, right half zeros: cropping the left half and resizing gives ones, except that bilinear
    # sampling of the last output column reaches a quarter pixel into the zeros (roi_align, aligned=True).
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 1
    out = crop_resize(x, torch.tensor([[0.0, 0.0, 1.0, 0.5]]), 8)
    assert torch.allclose(out[..., :7], torch.ones(1, 1, 8, 7), atol=1e-6)
    assert torch.allclose(out[..., 7], torch.full((1, 1, 8), 0.75), atol=1e-6)
    const = torch.full((2, 3, 8, 8), 0.3)
    boxes = random_resized_crop_boxes(2, _gen(), torch.device("cpu"))
    assert torch.allclose(crop_resize(const, boxes, 5), torch.full((2, 3, 5, 5), 0.3), atol=1e-6)


def test_crop_resize_is_differentiable() -> None:
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    crop_resize(x, torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), 8).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_normalize_round_trip() -> None:
    norm = Normalize(SPEC)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    y = norm(x)
    assert y.dtype == torch.float32
    assert torch.allclose(norm.denormalize(y), x.float() / 255, atol=1e-6)
    assert torch.allclose(y[:, 0], (x[:, 0].float() / 255 - 0.5) / 0.2, atol=1e-5)


def test_train_augment_modes_are_seeded() -> None:
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    for mode in TrainAugment.MODES:
        aug = TrainAugment(SPEC, mode, padding=2)
        a, b = aug(x, _gen(3)), aug(x, _gen(3))
        assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32 and torch.equal(a, b)
