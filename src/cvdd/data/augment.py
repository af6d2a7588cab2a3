"""Batched on-device augmentation with parameters drawn from an explicit generator.

No per-sample PIL work in a hot loop: crops, flips and random-resized crops are tensor operations on a
whole batch, on whatever device the batch lives on. Every random draw comes from the ``torch.Generator``
passed in, so a seeded run is reproducible and a resumed run can restore the generator's state.
"""

from __future__ import annotations

import math

import torch

from cvdd.data.specs import DatasetSpec

#: x / 255 in float32 for every byte x, computed on the CPU, per device (see :func:`unit_float`).
_UNIT_LUT: dict[torch.device, torch.Tensor] = {}


def unit_float(x: torch.Tensor) -> torch.Tensor:
    """Pixels as float32 in [0, 1]: uint8 ``x / 255``, anything else ``x.float()``.

    The one conversion of the package: a set kept as uint8 (exports, ``store=uint8``, random real images) gives the
    very floats a float32 copy of it made on the CPU would hold, batch by batch, so it never needs that 4x larger
    copy. Off the CPU the bytes are looked up in a table of the CPU's quotients: CUDA divides by a Python scalar
    as a multiplication by its reciprocal, which differs from ``x / 255`` in the last bit for about half the byte
    values, and would make a uint8 set's batches (and their stored labels) differ from its float32 copy's.

    Args:
        x: (..., H, W) uint8 in 0..255, or float in [0, 1].

    Returns:
        Same shape, float32; ``x`` itself when it is already float32 (do not modify it in place).
    """
    if x.dtype != torch.uint8:
        return x.float()
    if x.device.type == "cpu":
        return x.float().div_(255.0)
    return _unit_lut(x.device)[x.long()]


def _unit_lut(device: torch.device) -> torch.Tensor:
    """(256,) float32 ``arange(256) / 255`` divided on the CPU, on ``device``."""
    if device not in _UNIT_LUT:
        _UNIT_LUT[device] = (torch.arange(256, dtype=torch.float32) / 255.0).to(device)
    return _UNIT_LUT[device]


class Normalize:
    """uint8 (or [0, 1] float) images to normalised float32; the mean/std tensors are built once per device."""

    def __init__(self, spec: DatasetSpec) -> None:
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each of shape (1, 3, 1, 1), on ``device``."""
        if device not in self._cache:
            self._cache[device] = (self._mean.to(device), self._std.to(device))
        return self._cache[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch.

        Args:
            x: (B, 3, H, W) uint8 in 0..255, or float in [0, 1].

        Returns:
            (B, 3, H, W) float32, ``(x - mean) / std``.
        """
        mean, std = self.stats(x.device)
        return (unit_float(x) - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation: (B, 3, H, W) normalised float -> [0, 1] float (not clamped)."""
        mean, std = self.stats(x.device)
        return x * std + mean


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch horizontally with probability ``p``, independently."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the original size from the zero-padded batch (torchvision RandomCrop(pad)).

    Args:
        x: (B, C, H, W) batch, any dtype.
        padding: zero padding on every side, in pixels.
        generator: source of the per-image offsets.

    Returns:
        (B, C, H, W) batch of crops.
    """
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=generator)
    wp = w + 2 * padding
    rows = (oy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, wp)
    cols = (ox.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    # Two gathers (rows, then columns) select each image's window without a Python loop.
    return padded.gather(2, rows).gather(3, cols)


def random_resized_crop_boxes(
    n: int,
    generator: torch.Generator,
    device: torch.device,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Draw ``n`` RandomResizedCrop boxes, as fractions of the image (torchvision's sampling rule, vectorised).

    For each box, up to 10 candidate (area, aspect) draws are tried; the first that fits is taken, and a
    box that never fits falls back to the whole image (torchvision falls back to a centre crop of clamped
    aspect; the difference only matters for extreme ratios).

    Returns:
        (n, 4) float32 tensor of (top, left, height, width) in [0, 1].
    """
    tries = 10
    area = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect)
    h = torch.sqrt(area / aspect)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    idx = first.clamp(min=0).view(n, 1)
    hh = torch.where(first >= 0, h.gather(1, idx).squeeze(1), torch.ones(n, device=device))
    ww = torch.where(first >= 0, w.gather(1, idx).squeeze(1), torch.ones(n, device=device))
    top = torch.rand(n, device=device, generator=generator) * (1 - hh)
    left = torch.rand(n, device=device, generator=generator) * (1 - ww)
    return torch.stack([top, left, hh, ww], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image of a batch to its box and resize to ``size`` x ``size`` (bilinear, batched, differentiable).

    The sampling is ``roi_align``'s with an adaptive sampling ratio: an output cell that covers more than one input
    pixel (a downscale) averages several bilinear samples, so it is antialiased rather than aliased; an upscale or
    a same-size crop samples each cell's centre once (plain bilinear, the identity for the full box).

    It runs ``roi_align`` (one kernel each way on a GPU), except where a gradient must flow back to ``x`` on a
    CPU (recover's pixels): there ``roi_align``'s backward is a scalar loop (6.4 ms for recover's 100 images of
    32 px, forward + backward), so the same sampling is written as two interpolation matrices per box, rows and
    columns (it is separable), and the crop is two matrix products: 0.9 ms there, 196 ms instead of 339 ms at 224 px
    (``tests/data/test_augment.py`` checks it against ``roi_align`` to 1e-12 in float64). Without a gradient
    (training augmentation, soft-label plans, patch scoring) ``roi_align``'s forward is as fast or faster (8.5 ms
    against 16.9 ms for 16 images of 224 px), so it stays.

    Args:
        x: (B, C, H, W) float batch.
        boxes: (B, 4) (top, left, height, width) as fractions of the image; a box expanded over the batch
            (``boxes.expand(B, 4)``, stride 0) is one crop shared by every image and builds its matrices once.
        size: output side in pixels.

    Returns:
        (B, C, size, size) float batch.
    """
    b, _, h, w = x.shape
    if not x.is_floating_point():
        raise TypeError(f"crop_resize needs a floating-point batch, got {x.dtype}")
    if boxes.shape != (b, 4):
        raise ValueError(f"crop_resize needs one box per image, shape ({b}, 4); got {tuple(boxes.shape)}")
    if x.device.type == "cpu" and x.requires_grad and torch.is_grad_enabled():
        if boxes.stride(0) == 0:  # one shared box: one pair of matrices, broadcast over the batch
            return _crop_resize_matrices(x, boxes[:1], size)
        # In chunks of images, so that the matrices and the intermediate product stay small for large batches
        # (a 224 px unit of hundreds of images).
        return torch.cat([_crop_resize_matrices(xc, bc, size) for xc, bc in zip(x.split(128), boxes.split(128))])
    y0 = boxes[:, 0] * h
    x0 = boxes[:, 1] * w
    rois = torch.stack(
        [
            torch.arange(b, device=x.device, dtype=x.dtype),
            x0.to(x.dtype),
            y0.to(x.dtype),
            (x0 + boxes[:, 3] * w).to(x.dtype),
            (y0 + boxes[:, 2] * h).to(x.dtype),
        ],
        dim=1,
    )
    # Imported here: importing torchvision costs about 2.4 s of a 2 GHz core (it loads all its models), which every
    # command would pay at start, and recover's pixels never reach this line on a CPU.
    from torchvision.ops import roi_align

    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def _crop_resize_matrices(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`crop_resize` on a CPU: x (B, C, H, W), boxes (B, 4), or (1, 4) for one box shared by the batch."""
    _, _, h, w = x.shape
    f = boxes.to(torch.float64)  # positions in float64: cheap (the matrices are small), and roi_align-exact in float64
    rows = _resize_matrix(f[:, 0] * h, f[:, 2] * h, h, size, x.dtype)  # (B or 1, size, H)
    cols = _resize_matrix(f[:, 1] * w, f[:, 3] * w, w, size, x.dtype)  # (B or 1, size, W)
    with torch.autocast("cpu", enabled=False):  # the batch's dtype, as roi_align keeps it under autocast
        return rows[:, None] @ x @ cols[:, None].transpose(-1, -2)


def _resize_matrix(start: torch.Tensor, length: torch.Tensor, n_in: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Interpolation matrices of one axis: (N, size, n_in), row o holding the weights of output cell o.

    ``roi_align`` (``aligned=True``, adaptive sampling ratio) along one axis: cell o of a box starting at ``start``
    pixels with ``length`` pixels averages g = ceil(length / size) samples at start - 1/2 + (o + (i + 1/2) / g) *
    length / size, i < g (a box of no length has no samples and gives 0, as in ``roi_align``); a sample below -1
    or above n_in counts as 0, others are clamped into [0, n_in - 1] and interpolated linearly between their two
    neighbouring pixels.

    Args:
        start: (N,) first pixel coordinate of each box along the axis (float64).
        length: (N,) box extent in pixels (float64).
        n_in: input pixels along the axis.
        size: output cells.
        dtype: dtype of the returned matrices.
    """
    grid = torch.ceil(length / size)  # (N,) samples per cell, 0 for an empty box
    step = length / size
    i = torch.arange(max(int(grid.max()), 1), device=start.device, dtype=start.dtype)  # (G,)
    o = torch.arange(size, device=start.device, dtype=start.dtype)  # (size,)
    cells = grid.clamp_min(1)[:, None, None]
    pos = (start - 0.5)[:, None, None] + (o[:, None] + (i + 0.5) / cells) * step[:, None, None]  # (N, size, G)
    used = (i < grid[:, None, None]) & (pos >= -1) & (pos <= n_in)
    p = pos.clamp(min=0)
    low = p.floor().clamp(max=n_in - 1)
    frac = torch.where(low >= n_in - 1, torch.zeros_like(p), p - low)  # at the last pixel: no right neighbour
    low_i = low.long()
    high_i = (low_i + 1).clamp(max=n_in - 1)
    share = used.to(p.dtype) / cells
    # Each sample adds its two weights straight into its cell's row: (N, size, n_in), no (N, size, G, n_in) tensor.
    weights = torch.zeros(*pos.shape[:2], n_in, device=start.device, dtype=dtype)
    weights.scatter_add_(-1, low_i, ((1 - frac) * share).to(dtype))
    weights.scatter_add_(-1, high_i, (frac * share).to(dtype))
    return weights


class TrainAugment:
    """The training augmentation of the supervised engine, built once per run.

    Modes: ``crop_flip`` (random crop with zero padding + horizontal flip: CIFAR/Tiny recipes), ``rrc_flip``
    (random-resized crop + flip), ``flip``, ``none``. Output is normalised float32.
    """

    MODES = ("crop_flip", "rrc_flip", "flip", "none")

    def __init__(
        self, spec: DatasetSpec, mode: str = "crop_flip", padding: int = 4, rrc_scale: tuple[float, float] = (0.08, 1.0)
    ) -> None:
        if mode not in self.MODES:
            from cvdd.errors import ConfigError

            raise ConfigError(f"unknown augmentation {mode!r}; choose one of {', '.join(self.MODES)}")
        self.mode = mode
        self.padding = padding
        self.rrc_scale = rrc_scale
        self.size = spec.image_size
        self.normalize = Normalize(spec)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment and normalise a (B, 3, H, W) uint8 batch into (B, 3, S, S) float32."""
        if self.mode == "crop_flip":
            x = random_crop(x, self.padding, generator)
        elif self.mode == "rrc_flip":
            boxes = random_resized_crop_boxes(x.shape[0], generator, x.device, self.rrc_scale)
            # crop_resize needs floats: in [0, 1], which is what Normalize takes a float batch to be
            x = crop_resize(unit_float(x), boxes, self.size)
        if self.mode != "none":
            x = random_flip(x, generator)
        return self.normalize(x)
