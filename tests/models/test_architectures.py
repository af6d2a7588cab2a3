"""Every registered architecture at every supported size, plus golden structure checks (method doc §1.1-1.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvdd.models import count_parameters, create_model, first_bn, list_models, model_info
from cvdd.models.cifar import CIFAR_INPUT_SIZES, InvertedResidual

CASES = [(name, size) for name in list_models() for size in model_info(name).input_sizes]

# Golden values from the method doc §1.1 (CIFAR-style, params in millions for C=100 / C=200) and §1.2.
CIFAR_GOLDEN = {
    # name: (#BatchNorm2d, params C=100, params C=200)
    "resnet18": (20, 11.22, 11.27),
    "resnet50": (53, 23.71, 23.91),
    "resnet101": (104, 42.70, 42.90),
    "densenet121": (120, 7.05, 7.15),
    "mobilenetv2": (57, 2.41, 2.54),
    "shufflenetv2": (56, 0.44, 0.55),
}
IMAGENET_BN_GOLDEN = {
    "resnet18": 20,
    "resnet50": 53,
    "resnet101": 104,
    "densenet121": 121,
    "mobilenetv2": 52,
    "shufflenetv2": 56,
}


def _num_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}-{s}px" for n, s in CASES])
def test_forward_backward(name: str, size: int) -> None:
    torch.manual_seed(0)
    num_classes = 7
    model = create_model(name, num_classes, size)
    model.train()
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_every_name_has_a_small_size() -> None:
    # Every architecture must be usable on the CIFAR / Tiny-ImageNet datasets.
    for name in list_models():
        assert set(model_info(name).input_sizes) & set(CIFAR_INPUT_SIZES), name


@pytest.mark.parametrize("name", sorted(CIFAR_GOLDEN))
def test_cifar_golden_structure(name: str) -> None:
    n_bn, params_100, params_200 = CIFAR_GOLDEN[name]
    model = create_model(name, 100, 32)
    assert _num_bn(model) == n_bn
    assert round(count_parameters(model) / 1e6, 2) == params_100
    assert round(count_parameters(create_model(name, 200, 64)) / 1e6, 2) == params_200
    # Bias-free convs everywhere (doc: "All convs bias-free").
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    # No max-pool in any CIFAR-style net.
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("name", [*sorted(CIFAR_GOLDEN), "resnet8"])
@pytest.mark.parametrize(("size", "final"), [(32, 4), (64, 8)])
def test_cifar_final_spatial_size(name: str, size: int, final: int) -> None:
    """Final maps are 4×4 at 32 px and 8×8 at 64 px (resnet8 has one fewer stride-2 stage: 8×8 / 16×16)."""
    model = create_model(name, 10, size).eval()
    last_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    shapes: list[torch.Size] = []
    last_bn.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    expected = 2 * final if name == "resnet8" else final
    assert shapes[-1][-2:] == (expected, expected)


@pytest.mark.parametrize("name", sorted(IMAGENET_BN_GOLDEN))
def test_imagenet_golden_structure(name: str) -> None:
    model = create_model(name, 10, 224)
    assert _num_bn(model) == IMAGENET_BN_GOLDEN[name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 10


def test_imagenet_mobilenetv2_keeps_dropout() -> None:
    model = create_model("mobilenetv2", 10, 224)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.2]


def test_imagenet_models_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for name in IMAGENET_BN_GOLDEN:
        create_model(name, 10, 224)


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "resnet50", "resnet101"])
def test_first_bn_is_resnet_stem(name: str) -> None:
    model = create_model(name, 10, 32)
    assert first_bn(model) is model.bn1
    assert model.bn1.num_features == (16 if name == "resnet8" else 64)


def test_first_bn_is_densenet_first_bottleneck_bn1() -> None:
    model = create_model("densenet121", 10, 32)
    assert model.conv1.out_channels == 64
    assert first_bn(model) is model.dense1[0].bn1
    assert first_bn(model).num_features == 64


@pytest.mark.parametrize(("name", "stem_width"), [("mobilenetv2", 32), ("shufflenetv2", 24)])
def test_first_bn_is_stem_for_mobile_nets(name: str, stem_width: int) -> None:
    model = create_model(name, 10, 32)
    assert first_bn(model) is model.bn1
    assert model.bn1.num_features == stem_width


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenetv2", "shufflenetv2"])
def test_first_bn_of_torchvision_nets_is_stem(name: str) -> None:
    model = create_model(name, 10, 224)
    bn = first_bn(model)
    assert bn is not None and bn is next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_features in (24, 32, 64)


def test_mobilenetv2_projection_shortcut_quirk() -> None:
    model = create_model("mobilenetv2", 10, 32)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    # Stride-1 blocks that change width: 32→16, 16→24, 64→96, 160→320.
    projected = [b for b in blocks if len(b.shortcut) > 0]
    assert [(b.conv1.in_channels, b.conv3.out_channels) for b in projected] == [
        (32, 16),
        (16, 24),
        (64, 96),
        (160, 320),
    ]
    assert all(b.stride == 1 for b in projected)
    assert model.conv1.stride == (1, 1)
    # ReLU, not ReLU6.
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_resnet8_shape() -> None:
    model = create_model("resnet8", 10, 32)
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [1, 1, 1]
    assert not hasattr(model, "layer4")
    assert model.linear.in_features == 64


@pytest.mark.parametrize(
    ("name", "depth", "width"),
    [("convnet", 3, 128), ("convnet_d3_w64", 3, 64), ("convnet_d4_w64", 4, 64), ("convnet_d3_w32", 3, 32)],
)
def test_convnet_variants(name: str, depth: int, width: int) -> None:
    for size in (32, 64, 224):
        model = create_model(name, 10, size)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == depth and all(c.out_channels == width for c in convs)
        assert _num_bn(model) == depth
        assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == depth
        # ≤64 px: flatten the whole final map; 224 px: adaptive pool to 4×4 first.
        side = 4 if size > 64 else size // 2**depth
        assert model.classifier.in_features == width * side * side


def test_convnet_is_cheapest_resnet18_is_not() -> None:
    assert count_parameters(create_model("convnet_d3_w32", 10, 32)) < count_parameters(create_model("resnet8", 10, 32))
