"""Optional tracking: nothing without asking; TensorBoard event files with the engine's curves when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvdd import tracking
from cvdd.cli import main
from cvdd.errors import ConfigError


def test_no_tracker_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracking.ENV, raising=False)
    assert tracking.current() is None
    tracking.log("x", {"a": 1.0}, 1)  # a no-op


def test_unknown_tracker_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.ENV, "mlflow")
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        tracking.current()


def test_tensorboard_receives_the_training_curves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv(tracking.ENV, "")  # recorded, so the value the CLI sets is undone after the test
    args = ["squeeze", "--dataset", "digits", "--arch", "convnet_d3_w32", "--epochs", "2"]
    assert main([*args, "--out", str(tmp_path / "x"), "--quiet", "--track", f"tensorboard:{logdir}"]) == 0
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = events.Tags()["scalars"]
    loss = [t for t in tags if t.endswith("/train_loss")]
    assert loss and len(events.Scalars(loss[0])) == 2


def test_check_fails_early_without_starting_a_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.ENV, "tensorbord")
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        tracking.check()
    monkeypatch.setenv(tracking.ENV, "wandb:proj")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the wandb package"):
        tracking.check()
    assert tracking._tracker is None or tracking._configured != "wandb:proj"  # nothing was started
