"""Data layer: dataset specs, sources (digits, CIFAR, ImageFolder), uint8 caches, batching, augmentation."""

from cvdd.data.sources import FileSplit, RealDataset, TensorSplit, load_dataset
from cvdd.data.specs import DatasetSpec, known_datasets

__all__ = ["DatasetSpec", "FileSplit", "RealDataset", "TensorSplit", "known_datasets", "load_dataset"]
