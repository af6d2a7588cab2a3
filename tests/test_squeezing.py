from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.data.specs import DatasetSpec
from cvdd.errors import ArtifactError, ConfigError, ModelError
from cvdd.experts import list_experts, load_expert, read_expert_meta


def test_squeeze_digits_reaches_90_percent_and_writes_metadata(digits, tmp_path: Path) -> None:
    results = cvdd.squeeze(digits, archs=["convnet_d3_w32"], out=tmp_path, progress=False)
    (r,) = results
    assert r.test_acc >= 0.90 and not r.skipped
    meta = read_expert_meta(r.path)
    assert meta["kind"] == "expert" and meta["arch"] == "convnet_d3_w32"
    assert meta["dataset"]["classes"] == list(digits.spec.classes)
    assert meta["test_acc"] == pytest.approx(r.test_acc)
    assert meta["epochs"] == 12 and meta["seed"] == 0 and meta["preset"] == "digits"
    assert meta["recipe"]["optimizer"] == "sgd" and meta["cvdd_version"] == cvdd.__version__
    assert meta["wall_seconds"] > 0 and len(meta["history"]) == 12
    assert not (tmp_path / ".checkpoints" / "convnet_d3_w32.pt").exists()

    expert = load_expert(r.path, digits.spec)
    assert not any(p.requires_grad for p in expert.model.parameters()) and not expert.model.training
    from cvdd.engine import evaluate_accuracy

    acc = evaluate_accuracy(expert.model, digits.test, digits.spec, torch.device("cpu"))
    assert acc == pytest.approx(r.test_acc)
    assert list_experts(tmp_path) == [r.path]

    again = cvdd.squeeze(digits, archs=["convnet_d3_w32"], out=tmp_path, progress=False)
    assert again[0].skipped and again[0].test_acc == r.test_acc
    # scoring the test split more often changes no weight: the finished expert is still the one asked for
    watched = cvdd.squeeze(digits, archs=["convnet_d3_w32"], out=tmp_path, overrides={"eval_every": 3}, progress=False)
    assert watched[0].skipped

    before = (tmp_path / "convnet_d3_w32.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="another dataset, image size, normalisation, recipe or seed"):
        cvdd.squeeze(digits, archs=["convnet_d3_w32"], out=tmp_path, epochs=1, progress=False)
    # The same files under another normalisation (another named dataset's constants): not the same expert.
    renormed = dataclasses.replace(digits, spec=dataclasses.replace(digits.spec, mean=(0.4, 0.4, 0.4)))
    assert renormed.fingerprint == digits.fingerprint
    with pytest.raises(ArtifactError, match="another dataset, image size, normalisation"):
        cvdd.squeeze(renormed, archs=["convnet_d3_w32"], out=tmp_path, progress=False)
    with pytest.raises(ArtifactError, match=r"made with normalisation mean \["):
        load_expert(r.path, renormed.spec)
    assert before == (tmp_path / "convnet_d3_w32.safetensors").read_bytes()  # finished work untouched

    other = DatasetSpec("cifar-like", tuple("abcdefghijk"), 32, (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ArtifactError, match="11"):
        load_expert(r.path, other)


def test_squeeze_cifar_slice_writes_valid_metadata(cifar_slice: Path, tmp_path: Path) -> None:
    results = cvdd.squeeze(cifar_slice, archs=["resnet8"], out=tmp_path, preset="cifar10-cpu", epochs=1, progress=False)
    meta = json.loads((tmp_path / "resnet8.json").read_text())
    assert meta["dataset"]["name"] == "cifar10" and meta["dataset"]["image_size"] == 32
    assert meta["dataset"]["classes"][0] == "airplane" and meta["epochs"] == 1
    assert 0.0 <= results[0].test_acc <= 1.0 and meta["params"] > 10_000


def test_unknown_arch_fails_before_training(digits, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown architecture 'resnet9000'"):
        cvdd.squeeze(digits, archs=["convnet_d3_w32", "resnet9000"], out=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.json"))
    with pytest.raises(ConfigError, match="unknown squeeze preset"):
        cvdd.squeeze(digits, out=tmp_path, preset="nope", progress=False)
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        cvdd.squeeze(digits, out=tmp_path, overrides={"lrr": 0.1}, progress=False)


def test_throughput_of_a_run_resumed_after_its_last_epoch_comes_from_its_history() -> None:
    from cvdd.squeezing import _history_throughput

    history = [{"images_per_s": 100.0, "seconds": 2.0}, {"images_per_s": 50.0, "seconds": 2.0}]
    assert _history_throughput(history) == pytest.approx(75.0)  # 300 images in 4 s, not the mean of the rates
    assert _history_throughput([]) == 0.0


def test_architecture_names_take_the_registry_spelling(digits) -> None:
    """`ResNet8` and `resnet8` are one expert: one file name, one seed, one duplicate check."""
    from cvdd.squeezing import resolve_squeeze_config

    _, archs, _ = resolve_squeeze_config(digits, ["ResNet8", "ConvNet_D3_W32"], None, 1, None)
    assert archs == ["resnet8", "convnet_d3_w32"]
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_squeeze_config(digits, ["ResNet8", "resnet8"], None, 1, None)


def test_weights_that_do_not_match_their_metadata_are_trained_again(digit_experts: Path, digits, tmp_path, caplog):
    """A --force rewrite killed between the weights' rename and the metadata's leaves new weights under the old
    JSON: squeeze trains that expert again instead of skipping it (and later stages failing on the checksum)."""
    import shutil

    experts = tmp_path / "experts"
    shutil.copytree(digit_experts, experts)
    weights = experts / "convnet_d3_w32.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    res = cvdd.squeeze(digits, archs=["convnet_d3_w32"], out=experts, epochs=3, progress=False)
    assert "convnet_d3_w32: the weights do not match their metadata's checksum; training it again" in caplog.text
    assert not res[0].skipped
    load_expert(weights)  # consistent again
