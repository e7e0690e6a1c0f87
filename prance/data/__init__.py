"""Datasets for PRANCE: Fashion-MNIST (the offline default) and ImageNet-layout folders.

``build_dataset`` is the one entry point; every dataset it returns yields
(float32 [in_chans, img_size, img_size], int64 label) and carries ``info``.
"""

from __future__ import annotations

import os

import torch

from prance.data.base import DatasetInfo, IndexedDataset
from prance.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from prance.data.fashion_mnist import FashionMNIST
from prance.data.folder import ImageFolder
from prance.data.transforms import check_images
from prance.errors import PranceError

DATASETS = ("fashion-mnist", "folder")
# Fashion-MNIST ships a test set and no validation set, so both names mean it.
HELD_OUT_SPLITS = ("val", "test")

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "DatasetInfo",
    "FashionMNIST",
    "ImageFolder",
    "IndexedDataset",
    "build_dataset",
    "check_images",
    "holdout_split",
]


def build_dataset(
    name: str,
    split: str,
    *,
    img_size: int,
    in_chans: int,
    train_augment: bool,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> IndexedDataset:
    """The dataset ``name`` ("fashion-mnist" or "folder") for ``split`` ("train",
    "val" or "test"), transformed for a model of the given input shape.

    ``root`` is the folder root (required for "folder") or the Fashion-MNIST directory
    (optional). ``limit`` keeps a random subset of that many samples, drawn with
    ``seed``: a prefix would hold only the first classes of a folder.
    """
    if split not in ("train", *HELD_OUT_SPLITS):
        raise PranceError(f"unknown split {split!r}; use 'train', 'val' or 'test'")
    if limit is not None and limit < 1:
        raise PranceError(
            f"limit={limit} must be a positive number of samples; use e.g. --limit 1000"
        )
    dataset: IndexedDataset
    if name == "fashion-mnist":
        dataset = FashionMNIST(
            "train" if split == "train" else "test",
            img_size=img_size,
            in_chans=in_chans,
            train_augment=train_augment,
            data_dir=root,
        )
    elif name == "folder":
        if root is None:
            raise PranceError("dataset 'folder' needs a root directory; pass --data-dir ROOT")
        dataset = ImageFolder(
            root,
            "train" if split == "train" else "val",
            img_size=img_size,
            in_chans=in_chans,
            train_augment=train_augment,
        )
    else:
        raise PranceError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if limit is not None and limit < len(dataset):
        # Sorted, so the subset is read in storage order.
        dataset = dataset.select(_permutation(len(dataset), seed)[:limit].sort().values)
    return dataset


def holdout_split(
    dataset: IndexedDataset, fraction: float, seed: int
) -> tuple[IndexedDataset, IndexedDataset]:
    """Split off a random ``fraction`` of a (training) set, the same for the same seed.

    Subnets and selectors are chosen on the held-out part, so that choice is not made on
    images the meta-network was trained on.
    """
    if not 0.0 < fraction < 1.0:
        raise PranceError(f"holdout fraction {fraction} must be in (0, 1); use e.g. 0.1")
    n = len(dataset)
    n_holdout = round(n * fraction)
    if not 0 < n_holdout < n:
        raise PranceError(
            f"a holdout fraction of {fraction} of {n} samples leaves an empty part; "
            "use a larger --limit or another fraction"
        )
    order = _permutation(n, seed)
    holdout, train = order[:n_holdout].sort().values, order[n_holdout:].sort().values
    return dataset.select(train), dataset.select(holdout)


def _permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of range(n) fixed by ``seed`` alone (not by the global RNG state)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
