from __future__ import annotations

import pytest

from cvdd.config import Recipe, SqueezePreset, from_dict, parse_override, squeeze_presets
from cvdd.errors import ConfigError
from cvdd.models import list_models


def test_every_squeeze_preset_loads_and_names_real_architectures() -> None:
    presets = squeeze_presets()
    assert {"digits", "cifar10-cpu", "cifar10", "cifar100", "tiny-imagenet", "imagenette", "imagenet1k"} <= set(presets)
    known = set(list_models())
    for name, preset in presets.items():
        assert preset.archs and set(preset.archs) <= known, name
        assert preset.recipe.validate() is preset.recipe


def test_paper_cifar_recipe_matches_the_method() -> None:
    r = squeeze_presets()["cifar10"].recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.epochs, r.batch_size) == ("adam", 0.001, 0.0001, 200, 512)


def test_unknown_key_and_wrong_type_are_errors() -> None:
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        from_dict(Recipe, {"epoch": 3}, "recipe")
    with pytest.raises(ConfigError, match=r"recipe.lr: expected a number"):
        from_dict(Recipe, {"lr": "fast"}, "recipe")
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Recipe, {"epochs": 2.5}, "recipe")
    with pytest.raises(ConfigError, match="expected true or false"):
        from_dict(Recipe, {"nesterov": "yes"}, "recipe")
    preset = from_dict(SqueezePreset, {"archs": ["a"], "recipe": {"lr": 1}}, "p")
    assert preset.recipe.lr == 1.0 and isinstance(preset.recipe.lr, float)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        Recipe(optimizer="lion").validate()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("augment", "cutout", "unknown augment 'cutout'"),
        ("precision", "fp16", "unknown precision 'fp16'"),
        ("period_epochs", 0, "period_epochs must be >= 1"),
        ("cosine_eta", 0.0, "cosine_eta must be positive"),
        ("label_smoothing", 1.5, r"label_smoothing must be in \[0, 1\)"),
        ("warmup_epochs", 11.0, r"warmup_epochs must be in \[0, epochs\] \(got 11.0 of 10\)"),
        ("micro_batch", -1, "micro_batch, workers and padding must be >= 0"),
    ],
)
def test_recipe_values_that_would_fail_mid_run_are_refused_up_front(field: str, value, message: str) -> None:
    recipe = Recipe(epochs=10, schedule="periodic")
    setattr(recipe, field, value)
    with pytest.raises(ConfigError, match=message):
        recipe.validate()
    Recipe(epochs=1, warmup_epochs=1).validate()  # the squeeze presets' one warm-up epoch under --epochs 1


def test_parse_override() -> None:
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("archs=[a, b]") == ("archs", ["a", "b"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lr")
