"""Registry behaviour: dispatch by image size, errors, metadata, parameter and FLOP counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvdd.errors import ModelError
from cvdd.models import (
    ModelInfo,
    count_parameters,
    create_model,
    first_bn,
    forward_mflops,
    list_models,
    model_info,
    register_model,
)
from cvdd.models import registry as registry_module
from cvdd.models.cifar import CifarResNet
from cvdd.models.convnet import ConvNet

EXPECTED_MODELS = {
    "convnet",
    "convnet_d3_w32",
    "convnet_d3_w64",
    "convnet_d4_w64",
    "densenet121",
    "mobilenetv2",
    "resnet101",
    "resnet18",
    "resnet50",
    "resnet8",
    "shufflenetv2",
}


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register throw-away models without leaking them into other tests.

    Entries are immutable, so a shallow copy of the dict is a full snapshot.
    """
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_list_models_is_sorted_and_complete() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= EXPECTED_MODELS
    assert all(name == name.lower() for name in names)


def test_model_info_merges_small_and_large_builders() -> None:
    info = model_info("resnet18")
    assert isinstance(info, ModelInfo)
    assert info == ModelInfo("resnet18", "resnet", (32, 64, 224), info.description)
    assert "CIFAR" in info.description and "torchvision" in info.description
    assert model_info("resnet8").input_sizes == (32, 64)
    assert model_info("convnet_d3_w32").input_sizes == (32, 64, 224)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnet50", "resnet"),
        ("densenet121", "densenet"),
        ("mobilenetv2", "mobilenet"),
        ("shufflenetv2", "shufflenet"),
        ("convnet", "convnet"),
    ],
)
def test_families(name: str, family: str) -> None:
    assert model_info(name).family == family


def test_image_size_selects_cifar_or_torchvision_builder() -> None:
    assert isinstance(create_model("resnet18", 10, 32), CifarResNet)
    assert isinstance(create_model("resnet18", 10, 64), CifarResNet)
    large = create_model("resnet18", 10, 224)
    assert not isinstance(large, CifarResNet)
    assert type(large).__module__.startswith("torchvision")
    assert isinstance(create_model("convnet", 10, 224), ConvNet)


def test_names_are_case_insensitive_on_lookup() -> None:
    # The official scripts spell names "ResNet18", "Densenet121".
    assert isinstance(create_model("ResNet18", 10, 32), CifarResNet)
    assert model_info("Densenet121").name == "densenet121"


def test_unknown_name_raises_model_error_listing_choices() -> None:
    with pytest.raises(ModelError, match="unknown architecture 'foo'") as excinfo:
        create_model("foo", 10, 32)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "resnet18" in message and "convnet_d3_w32" in message
    with pytest.raises(ModelError, match="'foo'"):
        model_info("foo")
    with pytest.raises(ModelError, match="'foo'"):
        forward_mflops("foo", 10, 32)


@pytest.mark.parametrize(
    ("name", "size"), [("resnet8", 224), ("resnet18", 80), ("densenet121", 65), ("convnet", 8), ("mobilenetv2", 95)]
)
def test_unsupported_size_raises_model_error_naming_sizes(name: str, size: int) -> None:
    with pytest.raises(ModelError) as excinfo:
        create_model(name, 10, size)
    message = str(excinfo.value)
    assert f"'{name}'" in message and f"{size} px" in message
    assert ", ".join(str(s) for s in model_info(name).input_sizes) in message
    assert "\n" not in message


def test_non_integer_size_raises_model_error() -> None:
    with pytest.raises(ModelError, match="image_size"):
        create_model("resnet8", 10, 32.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "size", "cifar_style"),
    [("resnet18", 28, True), ("resnet18", 16, True), ("resnet18", 128, False), ("mobilenetv2", 96, False)],
)
def test_sizes_between_tested_ones_use_the_scale_builder(name: str, size: int, cifar_style: bool) -> None:
    # A folder dataset of 28 px images gets the CIFAR-style net, a 128 px one the torchvision net.
    model = create_model(name, 5, size)
    assert (type(model).__module__ == "cvdd.models.cifar") is cifar_style
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize(("name", "size"), [("convnet_d4_w64", 16), ("convnet_d3_w32", 28), ("convnet_d3_w32", 96)])
def test_convnet_off_grid_sizes(name: str, size: int) -> None:
    assert create_model(name, 5, size)(torch.randn(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize("num_classes", [0, -3])
def test_non_positive_num_classes_raises_model_error(num_classes: int) -> None:
    with pytest.raises(ModelError, match="num_classes"):
        create_model("resnet8", num_classes, 32)


def test_duplicate_registration_raises(isolated_registry: None) -> None:
    before = model_info("resnet18")
    with pytest.raises(ValueError, match="resnet18"):
        register_model("resnet18", "resnet", (32,), "dup")(lambda c, s: nn.Linear(1, c))
    with pytest.raises(ValueError, match="resnet18"):
        register_model("resnet18", "resnet", (224,), "dup")(lambda c, s: nn.Linear(1, c))
    assert model_info("resnet18") == before


def test_register_small_and_large_builders_then_dispatch(isolated_registry: None) -> None:
    @register_model("toy", "convnet", (32,), "small toy")
    def small(num_classes: int, image_size: int) -> nn.Module:
        return nn.Linear(1, num_classes)

    @register_model("toy", "convnet", (128, 224), "large toy")
    def large(num_classes: int, image_size: int) -> nn.Module:
        return nn.Linear(2, num_classes)

    assert "toy" in list_models()
    assert model_info("toy") == ModelInfo("toy", "convnet", (32, 128, 224), "small toy; large toy")
    assert create_model("toy", 3, 32).in_features == 1
    assert create_model("toy", 3, 128).in_features == 2
    with pytest.raises(ValueError, match="family"):
        register_model("toy", "resnet", (64,), "other family")(small)
    with pytest.raises(ValueError, match="small"):
        register_model("toy", "convnet", (64,), "second small")(small)


def test_duplicate_registration_is_not_leaked_between_tests() -> None:
    assert "toy" not in list_models()


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("Upper", (32,)), ("gap", (80,)), ("tiny", (8,)), ("empty", ())],
)
def test_invalid_registration_raises(name: str, sizes: tuple[int, ...], isolated_registry: None) -> None:
    with pytest.raises(ValueError):
        register_model(name, "convnet", sizes, "bad")


def test_count_parameters() -> None:
    assert count_parameters(nn.Linear(3, 4)) == 16
    assert count_parameters(nn.Sequential()) == 0


def test_first_bn() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    assert first_bn(seq) is seq[2]
    assert first_bn(nn.Linear(2, 2)) is None


def test_forward_mflops() -> None:
    small = forward_mflops("convnet_d3_w32", 10, 32)
    big = forward_mflops("resnet18", 10, 32)
    assert 0 < small < big
    # CIFAR ResNet-18 is ~0.56 GMAC per 32 px image, i.e. ~1.1 GFLOPs.
    assert big == pytest.approx(1110.8, rel=0.01)
    # Same weights, 4× the pixels.
    assert forward_mflops("resnet18", 10, 64) == pytest.approx(4 * big, rel=0.01)
    # Torchvision ResNet-18 at 224 px: ~1.82 GMAC.
    assert forward_mflops("resnet18", 1000, 224) == pytest.approx(3628, rel=0.01)
