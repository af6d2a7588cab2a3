"""Every shipped preset loads and validates, and the paper's datasets are covered at IPC 1, 10 and 50.

The expected numbers below are the method description's (``cvdd-method.md`` sections 3.2, 3.9 and 5), typed
again on purpose: a typo in a YAML file then fails here instead of silently changing a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cvdd.config import _load_yaml, get_squeeze_preset, recover_presets, squeeze_presets
from cvdd.data.specs import canonical_name, known_constants
from cvdd.models import list_models, model_info
from cvdd.pipeline import METHODS, DistillPreset, distill_presets

SQUEEZE = sorted(_load_yaml("squeeze.yaml"))
RECOVER = sorted(_load_yaml("recover.yaml"))
DISTILL = sorted(_load_yaml("distill.yaml"))

PAPER_DATASETS = ("cifar10", "cifar100", "tiny-imagenet", "imagenette", "imagenet1k")
PAPER_POOL = {"resnet18", "resnet50", "shufflenetv2", "mobilenetv2", "densenet121"}
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "imagenette": 224, "imagenet1k": 224}
#: The IPC 1 committees of the official scripts (setting 4).
IPC1_PAIR = {
    "cifar10": {"mobilenetv2", "densenet121"},
    "cifar100": {"shufflenetv2", "mobilenetv2"},
    "tiny-imagenet": {"resnet18", "mobilenetv2"},
    "imagenette": {"mobilenetv2", "densenet121"},
    "imagenet1k": {"resnet18", "shufflenetv2"},
}
#: ResNet-18 student per (dataset, IPC): batch size, micro-batch, base lr, smoothed-cosine eta (section 5).
EVAL = {
    ("cifar10", 1): (10, 5, 1e-3, 1.0),
    ("cifar10", 10): (16, 8, 1e-3, 1.0),
    ("cifar10", 50): (16, 8, 1e-3, 1.0),
    ("cifar100", 1): (16, 8, 1e-3, 1.0),
    ("cifar100", 10): (16, 8, 1e-3, 2.0),
    ("cifar100", 50): (16, 8, 1e-3, 1.0),
    ("tiny-imagenet", 1): (16, 8, 1e-3, 2.0),
    ("tiny-imagenet", 10): (16, 8, 1e-3, 1.0),
    ("tiny-imagenet", 50): (16, 8, 1e-3, 2.0),
    ("imagenette", 1): (10, 5, 5e-4, 2.0),
    ("imagenette", 10): (10, 5, 5e-4, 1.0),
    ("imagenette", 50): (10, 5, 5e-4, 2.0),
    ("imagenet1k", 1): (16, 8, 1e-3, 2.0),
    ("imagenet1k", 10): (16, 8, 1e-3, 2.0),
    ("imagenet1k", 50): (16, 8, 1e-3, 1.0),
}


def _dataset_of(name: str) -> str | None:
    """The paper dataset a ``<dataset>-ipc<N>`` preset name belongs to (None for other presets)."""
    base, sep, ipc = name.rpartition("-ipc")
    return base if sep and ipc.isdigit() and base in PAPER_DATASETS else None


def _size_ok(arch: str, size: int) -> bool:
    """Whether ``arch`` has a builder for images of ``size`` px (small 32/64 or large 224 nets)."""
    sizes = model_info(arch).input_sizes
    return size in sizes or (size > 64 and max(sizes) > 64)


@pytest.mark.parametrize("name", SQUEEZE)
def test_squeeze_preset_loads(name: str) -> None:
    preset = squeeze_presets()[name]
    assert preset.description and "\n" not in preset.description.strip()
    assert preset.archs and set(preset.archs) <= set(list_models()), name
    assert preset.recipe.validate() is preset.recipe


@pytest.mark.parametrize("name", RECOVER)
def test_recover_preset_loads(name: str) -> None:
    desc, cfg = recover_presets()[name]
    assert desc and "\n" not in desc.strip()
    assert cfg.validate() is cfg
    dataset = _dataset_of(name)
    if dataset is None:
        return
    # A paper preset names experts of its dataset's squeeze pool, and fits that pool.
    archs = get_squeeze_preset(dataset).archs
    assert set(cfg.fixed) <= set(archs) and (cfg.single is None or cfg.single in archs)
    cfg.validate(pool_size=len(archs))
    assert cfg.iterations == 4000 and cfg.lr == 0.25 and cfg.r_bn == 0.01 and cfg.first_bn_multiplier == 10
    assert cfg.voting == "prior" and cfg.temperature == 5 and cfg.committee_size == 2 and cfg.init == "patches"
    assert cfg.single == "resnet18"  # SRe2L++ recovers with ResNet-18 on every dataset
    assert cfg.classes_per_block == (10 if dataset in ("cifar10", "imagenette") else 100)
    expected_policy = {1: "fixed", 10: "pairs", 50: "random"}[cfg.ipc]
    assert cfg.committee == expected_policy
    if cfg.ipc == 1:
        assert set(cfg.fixed) == IPC1_PAIR[dataset] and len(cfg.fixed) == 2
    else:
        assert cfg.fixed == []


@pytest.mark.parametrize("name", DISTILL)
def test_distill_preset_loads(name: str) -> None:
    preset = distill_presets()[name]
    assert isinstance(preset, DistillPreset)
    assert preset.description and "\n" not in preset.description.strip()
    assert set(preset.methods) <= set(METHODS) and preset.ipcs
    cfg = preset.evaluate.validate()
    # Every preset it names exists and agrees with it.
    squeeze = squeeze_presets()[preset.squeeze_preset]
    _, recover = recover_presets()[preset.recover_preset]
    assert cfg.student in list_models()
    assert cfg.teacher == "committee" or cfg.teacher in squeeze.archs
    assert set(recover.fixed) <= set(squeeze.archs)
    recover.validate(pool_size=len(squeeze.archs))
    if "resnet18" in squeeze.archs and "sre2l++" in preset.methods:
        # The paper pool's SRe2L++ recovers with ResNet-18 (method section 3.2), not the highest-prior expert.
        assert recover.single == "resnet18"
    # BSSL labels each micro-batch with its own BN statistics: the micro-batch must split the batch evenly.
    assert cfg.micro_batch == 0 or cfg.batch_size % cfg.micro_batch == 0
    dataset = _dataset_of(name)
    if dataset is None:
        return
    (ipc,) = preset.ipcs
    assert preset.squeeze_preset == dataset and recover.ipc == ipc
    assert preset.methods == ["random-real", "sre2l++", "cvdd"]
    size = IMAGE_SIZE[dataset]
    assert all(_size_ok(a, size) for a in [*squeeze.archs, cfg.student])
    assert (cfg.batch_size, cfg.micro_batch, cfg.lr, cfg.cosine_eta) == EVAL[(dataset, ipc)]
    assert (cfg.student, cfg.epochs, cfg.temperature, cfg.teacher) == ("resnet18", 300, 20.0, "resnet18")
    assert (cfg.optimizer, cfg.weight_decay, cfg.label_mode) == ("adamw", 0.01, "stored")
    assert cfg.bssl and cfg.cutmix


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
def test_paper_dataset_covered_at_ipc_1_10_50(dataset: str) -> None:
    assert canonical_name(dataset) == dataset and known_constants(dataset)["image_size"] == IMAGE_SIZE[dataset]
    squeeze = squeeze_presets()[dataset]
    assert set(squeeze.archs) == PAPER_POOL
    covered = {ipc for name, p in distill_presets().items() if _dataset_of(name) == dataset for ipc in p.ipcs}
    assert covered >= {1, 10, 50}
    recover_ipcs = {cfg.ipc for name, (_, cfg) in recover_presets().items() if _dataset_of(name) == dataset}
    assert recover_ipcs >= {1, 10, 50}


def test_cli_lists_every_preset_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cvdd.cli import main

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    descriptions: list[tuple[str, str]] = [(n, p.description) for n, p in squeeze_presets().items()]
    descriptions += [(n, d) for n, (d, _) in recover_presets().items()]
    descriptions += [(n, p.description) for n, p in distill_presets().items()]
    for name, desc in descriptions:
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(desc.strip()) for line in lines), name
    assert main(["presets", "imagenette-ipc"]) == 0
    out = capsys.readouterr().out
    assert "imagenette-ipc50" in out and "cifar10-ipc1 " not in out


def test_distill_runs_sre2l_with_one_expert_under_a_named_committee(
    digit_experts: Path, digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a preset's ``fixed``/``pairs``/``random`` committee, SRe2L++ still gets one expert (``single``)."""
    import cvdd.api
    from cvdd.pipeline import distill

    seen: list[dict[str, Any]] = []

    class _StopError(Exception):
        pass

    def fake_recover(*args: Any, overrides: dict[str, Any], **kwargs: Any) -> None:
        seen.append(overrides)
        raise _StopError

    monkeypatch.setattr(cvdd.api, "recover", fake_recover)
    fixed = {"committee": "fixed", "fixed": ["resnet8", "convnet_d3_w32"]}
    for method in ("sre2l++", "cvdd"):
        preset = distill_presets()["digits"]
        preset.methods, preset.ipcs = [method], [1]
        with pytest.raises(_StopError):
            distill(digits, tmp_path, preset, experts_dir=digit_experts, progress=False, recover_overrides=fixed)
    assert (seen[0]["committee"], seen[0]["committee_size"]) == ("single", 1)
    assert (seen[1]["committee"], seen[1]["fixed"], seen[1]["committee_size"]) == ("fixed", fixed["fixed"], 2)


def test_small_budget_overrides_are_validated_and_reach_every_stage(
    digits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench --budget small`: the preset's small_budget is checked at load and its overrides reach each stage."""
    from cvdd.config import from_dict
    from cvdd.errors import ConfigError
    from cvdd.pipeline import distill

    gpu = distill_presets()["cifar10-gpu"].small_overrides()
    assert gpu["squeeze"]["epochs"] < 200 and gpu["recover"]["iterations"] < 4000 and gpu["evaluate"]["epochs"] == 50
    assert distill_presets()["digits"].small_overrides() == {"squeeze": {}, "recover": {}, "evaluate": {"epochs": 50}}
    for bad, match in (
        ({"squeeze": {"epoch": 1}}, "small_budget.squeeze"),
        ({"recover": {"bn_groups": "x"}}, "bn_groups"),
        ({"relabel": {}}, "unknown stage 'relabel'"),
    ):
        with pytest.raises(ConfigError, match=match):
            from_dict(DistillPreset, {"recover_preset": "digits", "small_budget": bad}, "p").validate("p")

    import cvdd.api

    seen: dict[str, Any] = {}

    class _StopError(Exception):
        pass

    def fake_squeeze(*args: Any, overrides: dict[str, Any] | None = None, **kwargs: Any) -> None:
        seen["squeeze"] = overrides
        raise _StopError

    monkeypatch.setattr(cvdd.api, "squeeze", fake_squeeze)
    preset = distill_presets()["digits"]
    with pytest.raises(_StopError):
        distill(digits, tmp_path, preset, progress=False, squeeze_overrides={"epochs": 1})
    assert seen["squeeze"] == {"epochs": 1}
