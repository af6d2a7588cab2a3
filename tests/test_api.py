"""The Python API: the CLI's names, importable lazily, never replaced by a submodule of the same name."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import cvdd
import cvdd.api


def test_every_api_name_stays_the_function_after_every_submodule_is_imported() -> None:
    """Importing a submodule binds it on its package: a module named like an API function would replace it."""
    for mod in pkgutil.walk_packages(cvdd.__path__, "cvdd."):
        importlib.import_module(mod.name)
    for name in cvdd.__all__[1:]:
        assert getattr(cvdd, name) is getattr(cvdd.api, name), name
    engine, loop = importlib.import_module("cvdd.engine"), importlib.import_module("cvdd.engine.loop")
    assert engine.fit is loop.fit  # the engine's function, not a module of that name
    assert set(cvdd.__all__) <= set(dir(cvdd))


def test_a_report_can_be_written_twice_in_one_session(tmp_path) -> None:
    """`cvdd.report` was a module after its first call (it imported the module of the same name)."""
    from cvdd.errors import ArtifactError

    for _ in range(2):  # the function runs both times and refuses the folder, as a user would see it
        with pytest.raises(ArtifactError, match="does not exist"):
            cvdd.report(tmp_path / "missing")


def test_committee_size_one_is_one_expert_also_under_a_preset_that_names_a_committee(
    digit_experts, digits, tmp_path, monkeypatch
) -> None:
    """A paper preset pins its CV-DD policy (fixed pair, pairs, random); N = 1 must still be SRe2L++ (one expert)."""
    import dataclasses

    import cvdd.config

    names = sorted(p.stem for p in digit_experts.glob("*.safetensors"))
    pinned = dataclasses.replace(cvdd.config.get_recover_preset("digits"), committee="fixed", fixed=names[:2])
    monkeypatch.setattr(cvdd.config, "get_recover_preset", lambda name: pinned)
    res = cvdd.recover(
        digit_experts,
        tmp_path / "n1",
        ipc=1,
        committee_size=1,
        iterations=2,
        init="real",
        dataset=digits,
        progress=False,
    )
    assert res.meta["method"] == "sre2l++" and res.meta["committee_policy"] == "single"
    assert all(len(c) == 1 for c in res.meta["committees"])


def test_the_experts_dataset_is_reloaded_under_the_name_it_was_squeezed_with(tmp_path) -> None:
    """A folder squeezed as `--dataset cifar100 --data DIR` reloads as cifar100 (its normalisation), not as a
    folder named DIR; a folder squeezed by its path reloads by its path; a moved one is reported."""
    from cvdd.api import _dataset_for_experts, _source_or_experts
    from cvdd.data.specs import known_constants
    from cvdd.errors import ConfigError

    folder = str(tmp_path)
    c100 = known_constants("cifar100")
    stored = {"name": "cifar100", "classes": ["a", "b"], **{k: c100[k] for k in ("image_size", "mean", "std")}}
    named = {"dataset_source": folder, "dataset": stored}
    assert _dataset_for_experts(named) == ("cifar100", folder)
    assert _dataset_for_experts({"dataset_source": folder, "dataset": {"name": "mine"}}) == (folder, None)
    # a folder merely called cifar100, loaded by its path (ImageNet normalisation): reloaded by its path
    called = {**named["dataset"], "mean": [0.485, 0.456, 0.406]}
    assert _dataset_for_experts({"dataset_source": folder, "dataset": called}) == (folder, None)
    assert _dataset_for_experts({"dataset_source": "torchvision:cifar10"}) == ("cifar10", None)
    assert _dataset_for_experts({"dataset_source": "digits", "dataset": {"name": "digits"}}) == ("digits", None)
    assert _source_or_experts(None, named, "/elsewhere") == ("cifar100", "/elsewhere")  # --data given again
    assert _source_or_experts("digits", named, None) == ("digits", None)  # --dataset given: the user's choice
    with pytest.raises(ConfigError, match=r"the experts' dataset \(/moved/away\) is not available; give --dataset"):
        _source_or_experts(None, {"dataset_source": "/moved/away"}, None)
