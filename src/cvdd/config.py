"""Typed configuration: dataclasses with defaults, YAML presets, and strict validation.

Unknown keys and wrong types are errors that name the key, never silently ignored, so a typo in a preset
cannot quietly change a recipe.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import yaml

from cvdd.errors import ConfigError

T = TypeVar("T")

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Validate (and lightly coerce: int -> float, list -> tuple) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} has the wrong type (expected {tp})")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check_type(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_check_type(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string, not a number
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types.

    Args:
        cls: a dataclass type.
        data: the mapping (from YAML or the CLI); None gives the defaults.
        where: a label for error messages (e.g. ``preset 'cifar10' recipe``).

    Raises:
        ConfigError: an unknown key or a value of the wrong type, naming both.
    """
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain JSON-ready dict (tuples become lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}


def identity_dict(obj: Any, late: dict[str, Any]) -> dict[str, Any]:
    """``to_dict(obj)`` without the ``late`` fields (added after the first release) that hold their default.

    Identities (hashes of runs, checkpoints, cached results) are built from this, so a run made before a field
    existed keeps its identity as long as the new field is left at its default.
    """
    out = to_dict(obj)
    for key, default in late.items():
        if out.get(key) == default:
            out.pop(key, None)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` from ``--set``; the value is read as YAML (``lr=0.1``, ``archs=[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as YAML ({reason})") from None
    return key.strip(), value


@dataclass
class Recipe:
    """A supervised training recipe (squeeze now, student training later).

    Attributes:
        epochs: passes over the training set.
        batch_size: images per optimiser step.
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 / decoupled weight decay.
        no_decay_bn_bias: exempt biases and normalisation parameters from weight decay.
        warmup_epochs: linear warm-up length (fractions allowed).
        schedule: ``cosine`` (to 0 at the end, smoothed by ``cosine_eta``), ``periodic`` (a cosine of half-period
            ``period_epochs`` that goes on past it: 0 after one period, the peak after two; the official
            ImageNette recipe, CosineAnnealingLR(T_max=100) for 300 epochs) or ``constant``.
        cosine_eta: smoothed cosine factor ½(1 + cos(π t / (T η))); 1 is plain cosine, 2 ends at half the LR.
        period_epochs: period of the ``periodic`` schedule.
        label_smoothing: cross-entropy label smoothing.
        augment: ``crop_flip``, ``rrc_flip``, ``flip`` or ``none``.
        padding: zero padding of ``crop_flip``.
        precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        channels_last: memory format; None means channels_last (on CUDA and, faster there too, on a CPU).
        compile: train through ``torch.compile(model)`` (the checkpoints and the returned model stay the plain
            module). Pays a compilation at the start (under a minute on a CPU); a student epoch then took
            0.70x the time on a 2-core CPU (``docs/benchmarks/switches-cpu.md``).
        eval_every: evaluate on the test split every N epochs (0: only after the last epoch).
        workers: DataLoader workers for streamed (large) datasets.
        micro_batch: split each batch into micro-batches of this many images, accumulating gradients into one
            optimiser step (0: no split). The student's BN (and a BSSL teacher's) sees one micro-batch.
        ghost_bn: run a step's micro-batches as one forward whose BN layers normalise each micro-batch separately
            (:func:`cvdd.engine.ghost.ghost_batchnorm`): the same step up to rounding, with a fraction of the
            kernel launches (for GPUs; one process only, not with ``compile``).
        checkpoint_every_s: write the resume checkpoint after an epoch only once this many seconds have passed
            since the last write (and always after the last epoch); 0 writes one after every epoch. Not part of
            the identity: it changes what a kill can lose, never the trained model. A ResNet-18 checkpoint with
            its AdamW state is 134 MB (0.2-0.3 s to write on the 2-core CPU), several times a 100-image student epoch
            on a GPU (``docs/benchmarks/student-cpu.md``).
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    cosine_eta: float = 1.0
    period_epochs: int = 100
    label_smoothing: float = 0.0
    augment: str = "crop_flip"
    padding: int = 4
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    eval_every: int = 0
    workers: int = 4
    micro_batch: int = 0
    ghost_bn: bool = False
    checkpoint_every_s: float = 60.0

    def identity(self) -> dict[str, Any]:
        """The fields that define a trained model (checkpoint and expert reuse); execution switches added later
        (``compile``) count only when set, so experts and checkpoints made before them are still recognised."""
        out = identity_dict(self, {"compile": False, "ghost_bn": False})
        out.pop("checkpoint_every_s")  # when to write a checkpoint never changes the model
        return out

    def validate(self) -> Recipe:
        """Check value ranges; return self."""
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ConfigError(f"epochs and batch_size must be positive (got {self.epochs}, {self.batch_size})")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd, adam or adamw")
        if self.schedule not in ("cosine", "periodic", "constant"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose cosine, periodic or constant")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive (got {self.lr})")
        if self.ghost_bn and self.compile:
            raise ConfigError("ghost_bn and compile cannot be combined; choose one")
        # Checked here, before any data is read or model trained: each of these fails deep inside a run otherwise
        # (division by zero in the schedule, a torch error at the first step, or a silently flat learning rate).
        if self.augment not in ("crop_flip", "rrc_flip", "flip", "none"):
            raise ConfigError(f"unknown augment {self.augment!r}; choose crop_flip, rrc_flip, flip or none")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")
        if self.schedule == "periodic" and self.period_epochs < 1:
            raise ConfigError(f"period_epochs must be >= 1 for the periodic schedule (got {self.period_epochs})")
        if not self.cosine_eta > 0:
            raise ConfigError(f"cosine_eta must be positive (got {self.cosine_eta})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs] (got {self.warmup_epochs} of {self.epochs})")
        if self.micro_batch < 0 or self.workers < 0 or self.padding < 0:
            raise ConfigError(
                "micro_batch, workers and padding must be >= 0 "
                f"(got {self.micro_batch}, {self.workers}, {self.padding})"
            )
        if not self.checkpoint_every_s >= 0:  # also refuses NaN
            raise ConfigError(f"checkpoint_every_s must be >= 0 seconds (got {self.checkpoint_every_s})")
        return self


@dataclass
class SqueezePreset:
    """A named squeeze configuration: which experts to train and how.

    Attributes:
        description: one line shown by ``cvdd presets``.
        archs: default expert architectures.
        recipe: the training recipe.
    """

    description: str = ""
    archs: list[str] = field(default_factory=list)
    recipe: Recipe = field(default_factory=Recipe)


def _load_yaml(name: str) -> dict[str, Any]:
    text = resources.files("cvdd.presets").joinpath(name).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {name} must be a mapping")
    return data


def squeeze_presets() -> dict[str, SqueezePreset]:
    """All squeeze presets shipped with cvdd (``presets/squeeze.yaml``), validated."""
    raw = _load_yaml("squeeze.yaml")
    out = {}
    for name, body in raw.items():
        preset = from_dict(SqueezePreset, body, f"squeeze preset '{name}'")
        preset.recipe.validate()
        out[name] = preset
    return out


def get_squeeze_preset(name: str) -> SqueezePreset:
    """One squeeze preset by name; an unknown name is a :class:`ConfigError` listing the valid ones."""
    presets = squeeze_presets()
    if name not in presets:
        raise ConfigError(f"unknown squeeze preset '{name}'; choose one of {', '.join(sorted(presets))}")
    return presets[name]


def refuse_owned(overrides: dict[str, Any] | None, owned: dict[str, str], what: str, owner: str) -> None:
    """Refuse overrides of fields a command sets itself (they would be replaced silently).

    Args:
        overrides: the user's overrides.
        owned: field -> where its value comes from instead (shown in the error).
        what: what the overrides are, e.g. ``"recover option"``.
        owner: who sets the fields, e.g. ``"the pipeline"``.

    Raises:
        ConfigError: ``<what> '<field>': <owner> sets it itself, from <where>``, for the first such field.
    """
    for key, where in owned.items():
        if key in (overrides or {}):
            raise ConfigError(f"{what} {key!r}: {owner} sets it itself, from {where}")


def apply_overrides(obj: T, overrides: dict[str, Any], where: str) -> T:
    """Return a copy of dataclass ``obj`` with ``overrides`` applied (validated like a preset)."""
    merged = {**to_dict(obj), **overrides}
    return from_dict(type(obj), merged, where)


def recover_presets() -> dict[str, Any]:
    """All recover presets (``presets/recover.yaml``): name -> (description, RecoverConfig), validated."""
    from cvdd.synthesis.recover import RecoverConfig

    out = {}
    for name, body in _load_yaml("recover.yaml").items():
        if not isinstance(body, dict) or set(body) - {"description", "recover"}:
            raise ConfigError(f"recover preset '{name}': expected keys description and recover")
        cfg = from_dict(RecoverConfig, body.get("recover"), f"recover preset '{name}'").validate()
        out[name] = (str(body.get("description", "")), cfg)
    return out


def get_recover_preset(name: str) -> Any:
    """One recover preset's RecoverConfig; an unknown name is a :class:`ConfigError` listing the valid ones."""
    presets = recover_presets()
    if name not in presets:
        raise ConfigError(f"unknown recover preset '{name}'; choose one of {', '.join(sorted(presets))}")
    return presets[name][1]
