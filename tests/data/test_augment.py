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


def _roi_align_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The reference: torchvision's roi_align with the sampling crop_resize promises."""
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    y0, x0 = boxes[:, 0] * h, boxes[:, 1] * w
    rois = torch.stack([torch.arange(b, dtype=x.dtype), x0, y0, x0 + boxes[:, 3] * w, y0 + boxes[:, 2] * h], dim=1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def test_cpu_crop_resize_is_roi_align_to_float64_rounding() -> None:
    """The CPU path (two interpolation matrices per box) samples exactly as roi_align: same-size crops, downscales
    (several samples per cell), upscales, boxes touching the border, and one box shared by the batch."""
    g = _gen(1)
    x = torch.randn(6, 3, 20, 28, dtype=torch.float64, requires_grad=True)
    boxes = random_resized_crop_boxes(6, g, torch.device("cpu"), scale=(0.05, 1.0)).double()
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    boxes[1] = torch.tensor([0.5, 0.7, 0.5, 0.3])  # bottom-right corner
    boxes[3] = torch.tensor([0.2, 0.3, 0.0, 0.4])  # no height: roi_align gives zeros
    shared = boxes[2:3].expand(6, 4)
    for bx in (boxes, shared):
        for size in (24, 7, 50):
            ours, ref = crop_resize(x, bx, size), _roi_align_crop(x, bx.contiguous(), size)
            assert torch.allclose(ours, ref, rtol=0, atol=1e-12), (size, float((ours - ref).abs().max()))
            gy = torch.randn_like(ref)
            (g_ours,) = torch.autograd.grad(ours, x, gy)
            (g_ref,) = torch.autograd.grad(ref, x, gy)
            assert torch.allclose(g_ours, g_ref, rtol=0, atol=1e-12)
    # float32, as recover calls it: within float rounding of the coordinates.
    x32 = torch.rand(4, 3, 32, 32, requires_grad=True)
    b32 = random_resized_crop_boxes(4, g, torch.device("cpu"))
    assert torch.allclose(crop_resize(x32, b32, 32), _roi_align_crop(x32, b32, 32), atol=1e-5)
    # Without a gradient to x (training augmentation, plans), it is roi_align itself.
    with torch.no_grad():
        assert torch.equal(crop_resize(x32, b32, 32), _roi_align_crop(x32, b32, 32))


def test_crop_resize_refuses_integers_and_a_wrong_box_count_and_ignores_autocast() -> None:
    import pytest

    x = torch.rand(3, 3, 8, 8, requires_grad=True)  # recover's case: the CPU path of two matrix products
    boxes = random_resized_crop_boxes(3, _gen(), torch.device("cpu"))
    with pytest.raises(TypeError, match="floating-point"):
        crop_resize((x.detach() * 255).to(torch.uint8), boxes, 8)
    with pytest.raises(ValueError, match=r"one box per image, shape \(3, 4\)"):
        crop_resize(x, boxes[:1], 8)  # a (1, 4) box is not silently shared; expand it for that
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert crop_resize(x, boxes, 8).dtype == torch.float32
    shared, repeated = crop_resize(x, boxes[:1].expand(3, 4), 8), crop_resize(x, boxes[:1].repeat(3, 1), 8)
    assert torch.allclose(shared, repeated, atol=1e-6)


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


def test_every_train_augment_mode_normalises_pixels_alike() -> None:
    """A flat grey image stays that grey in every mode: rrc_flip once normalised 0..255 floats as if in [0, 1]."""
    x = torch.full((4, 3, 8, 8), 200, dtype=torch.uint8)
    flat = Normalize(SPEC)(x)[:, :, 3:5, 3:5]  # the centre, which zero padding (crop_flip) never reaches
    for mode in TrainAugment.MODES:
        out = TrainAugment(SPEC, mode, padding=2)(x, _gen(1))
        assert torch.allclose(out[:, :, 3:5, 3:5], flat, atol=1e-5), mode
