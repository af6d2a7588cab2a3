"""The ConvNet of the dataset-distillation literature, with BatchNorm (small, fast, CPU-friendly experts).

``depth`` blocks of conv3×3(width)-BatchNorm2d-ReLU-AvgPool2d(2), then flatten and one Linear layer.
The literature's ConvNet usually uses instance norm; cvdd uses BatchNorm because recovery matches BN
statistics, so a committee member without BN layers would contribute nothing to that loss.

Input sizes: up to 64 px the flattened feature map is ``width * (size // 2**depth)**2`` (e.g. 128×4×4 =
2048 for the default net at 32 px). At 224 px the map after three blocks would be 28×28 (100k features for
width 128, a Linear larger than the whole conv trunk), so for sizes above 64 an adaptive average pool
reduces the map to 4×4 before flattening. Because the Linear's input width depends on the size, a model is
built for one image size and does not accept another.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from cvdd.models.registry import SMALL_MAX_SIZE, Builder, register_model

__all__ = ["CONVNET_INPUT_SIZES", "CONVNET_SPECS", "ConvNet", "ConvNetSpec"]

#: Image sides the ConvNets are registered for; one builder covers both small and large inputs.
CONVNET_INPUT_SIZES: tuple[int, ...] = (32, 64, 224)

#: Side of the pooled map fed to the classifier for inputs larger than SMALL_MAX_SIZE.
LARGE_INPUT_POOL = 4


@dataclass(frozen=True)
class ConvNetSpec:
    """A ConvNet variant.

    Attributes:
        depth: Number of conv-BN-ReLU-pool blocks.
        width: Channels of every conv.
    """

    depth: int
    width: int


class ConvNet(nn.Module):
    """ConvNet-D{depth}-W{width} with BatchNorm.

    Shapes: ``(N, 3, image_size, image_size) -> (N, num_classes)``.

    Args:
        spec: Depth and width.
        num_classes: Output logits.
        image_size: Input side the classifier is sized for.
    """

    def __init__(self, spec: ConvNetSpec, num_classes: int, image_size: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 3
        for _ in range(spec.depth):
            # Bias-free: the following BN's shift makes a conv bias redundant.
            blocks += [
                nn.Conv2d(in_ch, spec.width, 3, padding=1, bias=False),
                nn.BatchNorm2d(spec.width),
                nn.ReLU(),  # not in place: BN forward hooks used by recovery may keep the output
                nn.AvgPool2d(2),
            ]
            in_ch = spec.width
        self.features = nn.Sequential(*blocks)
        if image_size > SMALL_MAX_SIZE:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(LARGE_INPUT_POOL)
            side = LARGE_INPUT_POOL
        else:
            self.pool = nn.Identity()
            side = image_size // 2**spec.depth
        if side < 1:
            raise ValueError(f"ConvNet depth {spec.depth} is too deep for {image_size} px inputs")
        self.classifier = nn.Linear(spec.width * side * side, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


#: Registered ConvNets: name -> (spec, description).
CONVNET_SPECS: dict[str, tuple[ConvNetSpec, str]] = {
    "convnet": (ConvNetSpec(depth=3, width=128), "ConvNet-D3-W128 with BatchNorm (dataset-distillation standard)"),
    "convnet_d3_w64": (ConvNetSpec(depth=3, width=64), "ConvNet-D3-W64 with BatchNorm"),
    "convnet_d4_w64": (ConvNetSpec(depth=4, width=64), "ConvNet-D4-W64 with BatchNorm"),
    "convnet_d3_w32": (ConvNetSpec(depth=3, width=32), "ConvNet-D3-W32 with BatchNorm (smallest CPU expert)"),
}


def _builder(spec: ConvNetSpec) -> Builder:
    def build(num_classes: int, image_size: int) -> nn.Module:
        return ConvNet(spec, num_classes, image_size)

    return build


for _name, (_spec, _desc) in CONVNET_SPECS.items():
    register_model(_name, "convnet", CONVNET_INPUT_SIZES, _desc)(_builder(_spec))
