"""Datasets for PRANCE: Fashion-MNIST (the offline default) and ImageNet-layout folders.

``build_dataset`` is the one entry point; every dataset it returns yields
(float32 [in_chans, img_size, img_size], int64 label) and carries ``info``.
"""

from __future__ import annotations

import os

from prance.data.base import DatasetInfo, IndexedDataset
from prance.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from prance.data.fashion_mnist import FashionMNIST
from prance.data.folder import ImageFolder
from prance.data.splits import subset
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
    return subset(dataset, limit, seed)
