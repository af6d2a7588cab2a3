"""Model zoo: CIFAR-style, ImageNet-style (torchvision) and ConvNet architectures behind one registry.

Use :func:`create_model` with a lower-case name and the dataset's image size; the size selects the
CIFAR-style (32/64 px) or torchvision (224 px) version of names such as ``"resnet18"``.
"""

from __future__ import annotations

# Imported for their side effect: each module registers its builders at import time.
from cvdd.models import cifar, convnet, imagenet  # noqa: F401
from cvdd.models.checkpointing import checkpoint_blocks_of, checkpointed
from cvdd.models.registry import (
    ModelInfo,
    count_parameters,
    create_model,
    first_bn,
    forward_mflops,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ModelInfo",
    "checkpoint_blocks_of",
    "checkpointed",
    "count_parameters",
    "create_model",
    "first_bn",
    "forward_mflops",
    "list_models",
    "model_info",
    "register_model",
]
