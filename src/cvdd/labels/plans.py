"""Per-epoch augmentation plans shared by the teacher and the student.

A plan fixes, for one epoch over a synthetic set of N images, the order of the images, one random-resized
crop box and flip per image, and per batch a CutMix permutation and box. The online mode draws the plan from
a generator derived from (seed, epoch); the stored mode writes the same plan with the teacher's logits to one
file per epoch, and the student replays it: the inputs are rebuilt bit-identically, with no per-sample file,
no DataLoader and no patch to PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cvdd.data.augment import Normalize, crop_resize, random_resized_crop_boxes, unit_float


@dataclass
class EpochPlan:
    """Augmentation of one epoch.

    Attributes:
        order: (N,) int64 image index of each position.
        boxes: (N, 4) float32 crop boxes (top, left, height, width) as fractions, by position.
        flips: (N,) bool horizontal flips, by position.
        mix_perm: (N,) int64 CutMix partner of each position, as an offset inside its batch.
        mix_boxes: (num_batches, 4) int64 CutMix box (y0, x0, y1, x1) in pixels, one per batch (empty box = none).
        batch_size: images per batch (the last batch may be smaller).
    """

    order: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    mix_perm: torch.Tensor
    mix_boxes: torch.Tensor
    batch_size: int

    @property
    def num_batches(self) -> int:
        return int(self.mix_boxes.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "order": self.order,
            "boxes": self.boxes,
            "flips": self.flips,
            "mix_perm": self.mix_perm,
            "mix_boxes": self.mix_boxes,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], batch_size: int) -> EpochPlan:
        return cls(t["order"], t["boxes"], t["flips"], t["mix_perm"], t["mix_boxes"], batch_size)


def make_plan(
    n: int,
    batch_size: int,
    image_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    cutmix: bool = True,
) -> EpochPlan:
    """Draw one epoch's plan (on the generator's device).

    CutMix (method section 4.3): λ ~ U(0, 1) = Beta(1, 1); a square of side ⌊S·√(1−λ)⌋ centred at a uniform
    pixel, clipped to the image, the same box for every image of the batch, pasted from a random permutation.
    """
    dev = generator.device
    order = torch.randperm(n, device=dev, generator=generator)
    boxes = random_resized_crop_boxes(n, generator, dev, scale=scale)
    flips = torch.rand(n, device=dev, generator=generator) < 0.5
    nb = -(-n // batch_size)
    perms = []
    for b in range(nb):
        size = min(batch_size, n - b * batch_size)
        perms.append(
            torch.randperm(size, device=dev, generator=generator) if cutmix else torch.arange(size, device=dev)
        )
    lam = torch.rand(nb, device=dev, generator=generator)
    cut = torch.floor(image_size * torch.sqrt(1 - lam)).long()
    cy = torch.randint(0, image_size, (nb,), device=dev, generator=generator)
    cx = torch.randint(0, image_size, (nb,), device=dev, generator=generator)
    y0, y1 = (cy - cut // 2).clamp(0, image_size), (cy + cut // 2).clamp(0, image_size)
    x0, x1 = (cx - cut // 2).clamp(0, image_size), (cx + cut // 2).clamp(0, image_size)
    # Kept on the host: slicing the box needs Python ints, and one copy per epoch beats one sync per step.
    mix_boxes = torch.stack([y0, x0, y1, x1], dim=1).cpu()
    if not cutmix:
        mix_boxes = torch.zeros_like(mix_boxes)
    return EpochPlan(order, boxes, flips, torch.cat(perms), mix_boxes, batch_size)


def apply_plan(
    images: torch.Tensor, labels: torch.Tensor, plan: EpochPlan, step: int, normalize: Normalize
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build batch ``step`` of an epoch from the plan.

    Args:
        images: (N, 3, S, S) synthetic images on the device, float32 in [0, 1] or uint8 (only the batch's rows
            become floats).
        labels: (N,) int64 class labels.
        plan: the epoch's plan (same device).
        step: batch index.
        normalize: the dataset's normalisation.

    Returns:
        inputs (B, 3, S, S) normalised and mixed, labels (B,), partner labels (B,), and λ (B,): the share of each
        image that is its own after CutMix.
    """
    s = slice(step * plan.batch_size, (step + 1) * plan.batch_size)
    idx = plan.order[s]
    x = crop_resize(unit_float(images[idx]), plan.boxes[s], images.shape[-1])
    x = torch.where(plan.flips[s].view(-1, 1, 1, 1), x.flip(3), x)
    x = normalize(x)
    perm = plan.mix_perm[s]
    y0, x0, y1, x1 = (int(v) for v in plan.mix_boxes[step].tolist())
    y = labels[idx]
    area = (y1 - y0) * (x1 - x0)
    if area > 0:
        mixed = x.clone()
        mixed[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        x = mixed
    lam = torch.full((len(idx),), 1.0 - area / float(x.shape[-1] * x.shape[-2]), device=x.device)
    return x, y, y[perm], lam
