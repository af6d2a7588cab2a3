"""Optional experiment tracking: TensorBoard or Weights & Biases, only when installed and asked for.

Asked for with ``--track tensorboard`` / ``--track wandb`` on any subcommand, or ``CVDD_TRACK`` in the
environment (``tensorboard``, ``tensorboard:DIR``, ``wandb`` or ``wandb:PROJECT``). Nothing is imported
otherwise, and a missing package is a one-line error that says what to install. The training engine logs one
point per epoch (loss, accuracy, learning rate, throughput, test accuracy when measured) and recover one per
logged iteration (loss and the CE/BN terms of every expert), each under the run's progress label.
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol

from cvdd.errors import ConfigError

ENV = "CVDD_TRACK"


class Tracker(Protocol):
    def log(self, group: str, values: dict[str, float], step: int) -> None: ...


class _TensorBoard:
    def __init__(self, logdir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--track tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(logdir)

    def log(self, group: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{group}/{k}", v, step)
        self.writer.flush()


class _WandB:
    def __init__(self, project: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--track wandb needs the wandb package (pip install wandb)") from None
        self.run = wandb.init(project=project) if wandb.run is None else wandb.run

    def log(self, group: str, values: dict[str, float], step: int) -> None:
        self.run.log({f"{group}/{k}": v for k, v in values.items()} | {f"{group}/step": step})


_tracker: Tracker | None = None
_configured: str | None = None


def check() -> None:
    """Fail now (one line) on a ``CVDD_TRACK`` naming an unknown tracker or one whose package is missing; creates
    nothing (the tracker itself starts on the first logged value, on the main rank only)."""
    import importlib.util

    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return
    kind = spec.partition(":")[0]
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if package is None:
        raise ConfigError(f"unknown tracker {kind!r} in {ENV}; choose tensorboard or wandb")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--track {kind} needs the {package} package (pip install {package})")


def current() -> Tracker | None:
    """The tracker asked for in ``CVDD_TRACK`` (created once), or None."""
    global _tracker, _configured
    spec = os.environ.get(ENV, "").strip()
    if not spec:
        return None
    if spec != _configured:
        kind, _, arg = spec.partition(":")
        if kind == "tensorboard":
            _tracker = _TensorBoard(arg or "runs/tensorboard")
        elif kind == "wandb":
            _tracker = _WandB(arg or "cvdd")
        else:
            raise ConfigError(f"unknown tracker {kind!r} in {ENV}; choose tensorboard or wandb")
        _configured = spec
    return _tracker


def log(group: str, values: dict[str, Any], step: int) -> None:
    """Log the numeric ``values`` under ``group`` (a progress label, cleaned) when a tracker is active."""
    from cvdd import distributed as dd

    if not dd.is_main():  # one run per job in the tracker, not one per rank
        return
    tracker = current()
    if tracker is None:
        return
    clean = re.sub(r"[^A-Za-z0-9_.+-]+", "_", group).strip("_")
    tracker.log(clean, {k: float(v) for k, v in values.items() if isinstance(v, int | float)}, step)
