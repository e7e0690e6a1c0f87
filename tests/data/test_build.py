"""build_dataset (the single entry point) and the held-out part of the training split (prance.data.splits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from prance.data import IndexedDataset, build_dataset
from prance.data.splits import Holdout
from prance.data.base import DatasetInfo, Sample


class Numbered(IndexedDataset):
    """n samples whose label is their own index, so views reveal which samples they hold."""

    def __init__(self, n: int) -> None:
        self._labels = torch.arange(n)
        self._index = torch.arange(n)
        self.info = DatasetInfo("numbered", "train", ("x",), 1, 1, (0.0,), (1.0,))

    def __getitem__(self, i: int) -> Sample:
        row = self._index[i]
        return torch.zeros(1, 1, 1), self._labels[row]


def test_val_and_test_both_mean_the_fashion_mnist_test_set(
    small_fmnist_dir: Path, fmnist_dir: Path
) -> None:
    # No root: the installed package is found on its own (fmnist_dir only skips without it).
    val = build_dataset("fashion-mnist", "val", img_size=28, in_chans=1, train_augment=False)
    test = build_dataset("fashion-mnist", "test", img_size=28, in_chans=1, train_augment=False)
    assert len(val) == len(test) == 10_000 and torch.equal(val.targets, test.targets)
    assert val.info.split == "test" and val.info.num_classes == 10
    train = build_dataset(
        "fashion-mnist", "train", img_size=28, in_chans=1, train_augment=True, root=small_fmnist_dir
    )
    assert train.info.split == "train" and len(train) == 64


def test_deit_shaped_fashion_mnist_batches(small_fmnist_dir: Path) -> None:
    dataset = build_dataset(
        "fashion-mnist",
        "train",
        img_size=224,
        in_chans=3,
        train_augment=True,
        root=small_fmnist_dir,
    )
    images, labels = next(iter(DataLoader(dataset, batch_size=16, shuffle=True)))
    assert images.shape == (16, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10


def test_limit_is_a_random_subset_fixed_by_the_seed(fmnist_dir: Path) -> None:
    def limited(limit: int, seed: int) -> torch.Tensor:
        dataset = build_dataset(
            "fashion-mnist",
            "test",
            img_size=28,
            in_chans=1,
            train_augment=False,
            limit=limit,
            seed=seed,
        )
        return dataset.targets

    first = limited(200, 0)
    assert len(first) == 200 and torch.equal(first, limited(200, 0))
    assert not torch.equal(first, limited(200, 1))
    assert len(first.unique()) == 10  # a random subset, not a prefix of one class
    assert len(limited(20_000, 0)) == 10_000  # a limit caps, it never pads


def test_folder_val_and_test_read_the_val_split(image_root: Path) -> None:
    for split in ("val", "test"):
        dataset = build_dataset(
            "folder", split, img_size=24, in_chans=3, train_augment=False, root=image_root
        )
        assert len(dataset) == 3 and dataset.info.split == "val"
        assert dataset[0][0].shape == (3, 24, 24)
    limited = build_dataset(
        "folder", "train", img_size=24, in_chans=1, train_augment=True, root=image_root, limit=4
    )
    assert len(limited) == 4 and limited[3][0].shape == (1, 24, 24)


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"name": "cifar"}, ("unknown dataset 'cifar'", "fashion-mnist, folder")),
        ({"split": "dev"}, ("unknown split 'dev'", "'train', 'val' or 'test'")),
        ({"name": "folder"}, ("needs a root directory", "--data-dir")),
        ({"limit": 0}, ("limit=0", "--limit")),
        ({"in_chans": 4}, ("in_chans=4", "use 1 (grey) or 3 (RGB)")),
        ({"img_size": 0}, ("img_size=0", "--img-size")),
    ],
    ids=["name", "split", "folder-root", "limit", "in-chans", "img-size"],
)
def test_bad_arguments_name_the_fix(
    prance_error, small_fmnist_dir: Path, kwargs: dict, fragments: tuple[str, ...]
) -> None:
    args = {
        "name": "fashion-mnist",
        "split": "train",
        "img_size": 28,
        "in_chans": 1,
        "train_augment": False,
    }
    args.update(kwargs)
    if args["name"] == "fashion-mnist":
        args["root"] = str(small_fmnist_dir)
    with prance_error(*fragments):
        build_dataset(**args)


def test_holdout_is_disjoint_complete_and_deterministic() -> None:
    dataset = Numbered(1000)
    train, holdout = Holdout(0.1, seed=0).split(dataset)
    assert len(train) == 900 and len(holdout) == 100
    assert set(train.targets.tolist()).isdisjoint(holdout.targets.tolist())
    assert sorted(train.targets.tolist() + holdout.targets.tolist()) == list(range(1000))
    again_train, again_holdout = Holdout(0.1, seed=0).split(dataset)
    assert torch.equal(holdout.targets, again_holdout.targets) and torch.equal(
        train.targets, again_train.targets
    )
    assert not torch.equal(holdout.targets, Holdout(0.1, seed=1).split(dataset)[1].targets)
    # Not a prefix or suffix: the held-out samples are spread over the whole set.
    assert holdout.targets.min() < 100 and holdout.targets.max() >= 900


def test_holdout_ignores_the_global_rng() -> None:
    torch.manual_seed(0)
    first = Holdout(0.2, seed=7).split(Numbered(50))[1].targets
    torch.manual_seed(1)
    assert torch.equal(first, Holdout(0.2, seed=7).split(Numbered(50))[1].targets)


def test_holdout_parts_are_full_datasets(small_fmnist_dir: Path) -> None:
    dataset = build_dataset(
        "fashion-mnist",
        "train",
        img_size=28,
        in_chans=1,
        train_augment=False,
        root=small_fmnist_dir,
    )
    train, holdout = Holdout(0.25, seed=0).split(dataset)
    assert holdout.info == train.info == dataset.info
    images, labels = next(iter(DataLoader(holdout, batch_size=len(holdout))))
    assert images.shape == (16, 1, 28, 28)
    assert torch.equal(labels, holdout.targets)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_holdout_fraction_must_leave_two_non_empty_parts(prance_error, fraction: float) -> None:
    with prance_error("holdout fraction"):
        Holdout(fraction, seed=0).split(Numbered(100))
