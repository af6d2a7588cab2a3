"""ImageNet-style networks (method doc §1.2) for 224 px data (ImageNette, ImageNet-1k).

These are the torchvision constructors, built with ``weights=None`` (cvdd never downloads weights here; a
caller that wants the ImageNet-1k pretrained pool loads a checkpoint explicitly) and with the classifier
replaced by a fresh ``Linear(in_features, num_classes)`` in PyTorch's default initialisation, as the
official code does. They share their user-facing names with the CIFAR-style nets of :mod:`cvdd.models.cifar`;
the registry picks this version for 224 px inputs.

Note that torchvision's MobileNetV2 keeps its ``Dropout(p=0.2)`` before the new Linear (method doc §4.2).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from cvdd.models.registry import Builder, register_model

__all__ = ["IMAGENET_INPUT_SIZES", "TORCHVISION_SPECS", "TorchvisionSpec", "replace_classifier"]

#: Image sides the torchvision nets are registered for.
IMAGENET_INPUT_SIZES: tuple[int, ...] = (224,)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to build one torchvision net and where its classifier Linear lives.

    Attributes:
        family: Registry family.
        constructor: name of the ``torchvision.models`` builder (it accepts ``weights=None``). A name, not the
            function: importing torchvision loads all its models (about 2.4 s of a 2 GHz core), which only a
            224 px net needs.
        head: Dotted path of the final ``nn.Linear`` (e.g. ``"fc"`` or ``"classifier.1"``).
        description: One-line description.
    """

    family: str
    constructor: str
    head: str
    description: str


def replace_classifier(model: nn.Module, head: str, num_classes: int) -> nn.Module:
    """Swap the Linear at dotted path ``head`` for a fresh ``Linear(in_features, num_classes)``.

    Args:
        model: The network; modified in place.
        head: Dotted module path of the classifier, e.g. ``"classifier.1"``.
        num_classes: New number of outputs.

    Returns:
        ``model``, for chaining.
    """
    old = model.get_submodule(head)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"expected nn.Linear at '{head}', found {type(old).__name__}")
    parent_path, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    "resnet18": TorchvisionSpec("resnet", "resnet18", "fc", "torchvision ResNet-18 (224 px)"),
    "resnet50": TorchvisionSpec("resnet", "resnet50", "fc", "torchvision ResNet-50 (224 px)"),
    "resnet101": TorchvisionSpec("resnet", "resnet101", "fc", "torchvision ResNet-101 (224 px)"),
    "densenet121": TorchvisionSpec("densenet", "densenet121", "classifier", "torchvision DenseNet-121 (224 px)"),
    "mobilenetv2": TorchvisionSpec(
        "mobilenet", "mobilenet_v2", "classifier.1", "torchvision MobileNetV2 with dropout 0.2 (224 px)"
    ),
    "shufflenetv2": TorchvisionSpec("shufflenet", "shufflenet_v2_x1_0", "fc", "torchvision ShuffleNetV2 x1.0 (224 px)"),
}


def _builder(spec: TorchvisionSpec) -> Builder:
    def build(num_classes: int, image_size: int) -> nn.Module:
        del image_size  # torchvision nets end in adaptive pooling
        constructor = getattr(importlib.import_module("torchvision.models"), spec.constructor)
        return replace_classifier(constructor(weights=None), spec.head, num_classes)

    return build


for _name, _spec in TORCHVISION_SPECS.items():
    register_model(_name, _spec.family, IMAGENET_INPUT_SIZES, _spec.description)(_builder(_spec))
