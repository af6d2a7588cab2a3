"""Per-iteration augmentation, learning-rate schedule and pixel clamping of recover (method doc §3.5-3.7)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cvdd.data.augment import crop_resize, random_resized_crop_boxes
from cvdd.errors import ConfigError

__all__ = ["clamp_to_valid", "cosine_lr", "recover_augment"]


def recover_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    image_size: int,
    jitter: int,
    scale: tuple[float, float] = (0.08, 1.0),
    shared_crop: bool = True,
    jitter_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random-resized crop + horizontal flip + cyclic roll jitter, differentiable with respect to ``x``.

    The steps, in the official order (method doc §3.6):

    1. a random-resized crop (area fraction in ``scale``, aspect in [3/4, 4/3]) resized to ``image_size``
       (bilinear, antialiased when downscaling) and a horizontal flip with probability 1/2. With
       ``shared_crop`` one box and one flip decision serve the whole batch, as the official code does by
       applying torchvision's transforms to the 4-D batch; otherwise each image draws its own;
    2. a cyclic ``torch.roll`` of the whole batch by (off_h, off_w), each drawn independently and uniformly
       from the integers {0, ..., jitter} (inclusive, non-negative, as in the official code).

    Draw order, for reproducibility: crop boxes, then flips (both from ``generator``), then the two roll
    offsets (from ``jitter_generator`` or ``generator``).

    Args:
        x: (B, C, H, W) normalised synthetic batch (usually the leaf being optimised).
        generator: source of the crop and flip draws; must live on ``x``'s device.
        image_size: output side S.
        jitter: largest roll offset in pixels, >= 0 (0 disables the roll).
        scale: (min, max) area fraction of the random-resized crop.
        shared_crop: one crop box and one flip for the whole batch (official) instead of one per image.
        jitter_generator: generator of the roll offsets. ``torch.roll`` needs host integers, so offsets drawn on
            a CUDA generator cost a device synchronisation per iteration; a CPU generator here avoids it.
            Default: ``generator``.

    Returns:
        (B, C, S, S) augmented batch, connected to ``x`` in the autograd graph.

    Raises:
        ConfigError: negative jitter or an invalid crop scale.
    """
    if jitter < 0:
        raise ConfigError(f"jitter must be >= 0 pixels, got {jitter}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    b = x.shape[0]
    n = 1 if shared_crop else b
    boxes = random_resized_crop_boxes(n, generator, x.device, scale=scale)
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    out = crop_resize(x, boxes.expand(b, 4), image_size)
    # torch.where keeps the flip decision on the device: no host synchronisation, and the (1, 1, 1, 1) mask of a
    # shared flip broadcasts over the batch.
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)
    if jitter > 0:
        gen = jitter_generator if jitter_generator is not None else generator
        offsets = torch.randint(0, jitter + 1, (2,), generator=gen, device=gen.device)
        off_h, off_w = (int(v) for v in offsets.tolist())
        out = torch.roll(out, shifts=(off_h, off_w), dims=(2, 3))
    return out


def cosine_lr(step: int, total: int, base_lr: float) -> float:
    """Learning rate of iteration ``step``: ½ (1 + cos(π · step / total)) · base_lr (no warm-up).

    Recover sets it every iteration for step = 0 … total − 1, so the last step still has a small positive rate;
    ``step = total`` gives 0.

    Raises:
        ValueError: ``total`` is not positive.
    """
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    return 0.5 * (1.0 + math.cos(math.pi * step / total)) * base_lr


def _channel_view(v: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics (C,) or (1, C, 1, 1) as a (1, C, 1, 1) tensor on ``like``'s device and dtype."""
    return torch.as_tensor(v, device=like.device, dtype=like.dtype).reshape(1, -1, 1, 1)


@torch.no_grad()
def clamp_to_valid(
    x: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """Clamp each channel c of a normalised batch to [−m_c/s_c, (1 − m_c)/s_c], in place.

    That interval is the normalised image of the valid pixel range [0, 1], so after each Adam step the
    synthetic images stay displayable (method doc §3.7). Runs under ``no_grad`` so it works on the leaf being
    optimised without entering the graph.

    Args:
        x: (B, C, H, W) normalised pixels; modified in place.
        mean: (C,) or (1, C, 1, 1) channel means m.
        std: (C,) or (1, C, 1, 1) channel standard deviations s.

    Returns:
        ``x`` itself.
    """
    m = _channel_view(mean, x)
    s = _channel_view(std, x)
    return x.clamp_(min=-m / s, max=(1 - m) / s)
