"""Dataset specifications: the constants every stage shares.

A :class:`DatasetSpec` carries what squeeze, recover, relabel and evaluate must agree on: the class
names in label order, the image size, the normalisation, and the recover jitter. It is stored in every
artifact's metadata so that a checkpoint made for one dataset is refused on another.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from cvdd.errors import DataError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class DatasetSpec:
    """What identifies a dataset for every stage.

    Attributes:
        name: short key (``digits``, ``cifar10``, ``my-folder`` ...).
        classes: class names in label order; label ``i`` is ``classes[i]``.
        image_size: side of the square images the models see, in pixels.
        mean: per-channel mean in [0, 1] used for normalisation.
        std: per-channel standard deviation in [0, 1].
        jitter: maximum roll jitter (pixels) of recover's per-iteration augmentation.
        default_preset: squeeze recipe preset used when the user names none.
    """

    name: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: int = 4
    default_preset: str = "cifar10"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def large(self) -> bool:
        """True for ImageNet-scale inputs (224 px) that stream from disk instead of living in memory."""
        return self.image_size > 64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=str(d["name"]),
            classes=tuple(d["classes"]),
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            jitter=int(d.get("jitter", 4)),
            default_preset=str(d.get("default_preset", "cifar10")),
            extra=dict(d.get("extra", {})),
        )

    def input_key(self) -> list[Any]:
        """What a network trained on this dataset depends on besides its images: image size, normalisation, classes.

        Part of the identity of experts and their checkpoints (the data's fingerprint covers only its files: the
        same folder loads at another size or with another named dataset's normalisation).
        """
        # 4 decimals: statistics computed from the data (digits) differ in the 7th digit between reduction orders
        # (torch versions, CPUs); different normalisations differ by far more.
        return [self.image_size, [round(v, 4) for v in self.mean], [round(v, 4) for v in self.std], list(self.classes)]

    def check_compatible(self, other: DatasetSpec, what: str) -> None:
        """Raise :class:`DataError` unless ``other`` has the same classes, order, image size and normalisation.

        Args:
            other: the spec stored with an artifact (an expert, a synthetic set).
            what: how to name that artifact in the message.
        """
        if other.num_classes != self.num_classes:
            raise DataError(
                f"{what} was made for dataset '{other.name}' with {other.num_classes} classes, "
                f"but '{self.name}' has {self.num_classes}"
            )
        if tuple(other.classes) != tuple(self.classes):
            diff = [f"{i}:{a}!={b}" for i, (a, b) in enumerate(zip(other.classes, self.classes)) if a != b][:3]
            raise DataError(
                f"{what} was made for dataset '{other.name}' whose class order differs from '{self.name}' "
                f"({', '.join(diff)})"
            )
        if other.image_size != self.image_size:
            raise DataError(
                f"{what} was made for {other.image_size} px images, but '{self.name}' uses {self.image_size} px"
            )
        pairs = zip((*other.mean, *other.std), (*self.mean, *self.std))
        if any(abs(a - b) > 1e-4 for a, b in pairs):
            raise DataError(
                f"{what} was made with normalisation mean {list(other.mean)} std {list(other.std)}, "
                f"but '{self.name}' uses mean {list(self.mean)} std {list(self.std)}"
            )


# Known datasets. Constants from the method description (section 0.1); class lists are filled from the
# data itself for ImageFolder-based ones (Tiny-ImageNet, ImageNette, ImageNet-1K) because their order is
# that of the folders the user has.
_KNOWN: dict[str, dict[str, Any]] = {
    "digits": dict(
        image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), jitter=4, default_preset="digits", num_classes=10
    ),
    "cifar10": dict(
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        jitter=4,
        default_preset="cifar10",
        num_classes=10,
    ),
    "cifar100": dict(
        image_size=32,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        jitter=4,
        default_preset="cifar100",
        num_classes=100,
    ),
    "tiny-imagenet": dict(
        image_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD, jitter=4, default_preset="tiny-imagenet", num_classes=200
    ),
    "imagenette": dict(
        image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, jitter=32, default_preset="imagenette", num_classes=10
    ),
    "imagenet1k": dict(
        image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, jitter=32, default_preset="imagenet1k", num_classes=1000
    ),
}

# Alternative spellings users type.
_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tiny_imagenet": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet",
    "imagenet-nette": "imagenette",
    "imagenet": "imagenet1k",
    "imagenet-1k": "imagenet1k",
}


def known_datasets() -> list[str]:
    """Names accepted by ``--dataset`` (besides a path to an ImageFolder directory or tarball)."""
    return sorted(_KNOWN)


def canonical_name(name: str) -> str | None:
    """The canonical key of a known dataset name, or None."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    return key if key in _KNOWN else None


def known_constants(name: str) -> dict[str, Any]:
    """Image size, mean, std, jitter and default preset of a known dataset."""
    key = canonical_name(name)
    if key is None:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(known_datasets())} or give a path")
    out = dict(_KNOWN[key])
    out.pop("num_classes")
    return out


def make_spec(name: str, classes: tuple[str, ...] | list[str], **overrides: Any) -> DatasetSpec:
    """Build a spec for a known dataset name with the given class list (and optional overrides).

    A class list of another length than the known dataset's (a subset such as ImageNet-100 given as
    ``imagenet1k``, or a folder that holds something else) is used with a warning, not refused.
    """
    consts = known_constants(name)
    key = canonical_name(name) or name
    expected = _KNOWN[key]["num_classes"]
    if len(classes) != expected:
        log.warning(
            "'%s' has %d classes, but the data given for it has %d: using %s's constants (normalisation, size, "
            "presets) for it",
            key,
            expected,
            len(classes),
            key,
        )
    consts.update({k: v for k, v in overrides.items() if v is not None})
    return DatasetSpec(name=key, classes=tuple(classes), **consts)
