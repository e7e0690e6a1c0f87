"""Where every number comes from (DESIGN.md §8): training images, a seeded holdout, the test split.

The holdout is carved once from the *whole* training split by a seeded permutation, so every
stage of a pipeline (dense, meta-network, selector, fine-tuning) that uses the same
:class:`Holdout` leaves out exactly the same images, whatever ``--limit`` it trains with:
limits subsample each part after the split, never across it. Training never sees the
holdout; every choice (best epoch, subnet, budget calibration) is made on it; only final
evaluation and reports read the test split.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from prance.data.base import IndexedDataset
from prance.errors import PranceError

#: Fraction of the training split held out by default, and the seed that picks it.
DEFAULT_HOLDOUT_FRACTION = 0.1
DEFAULT_HOLDOUT_SEED = 0


@dataclass(frozen=True)
class Holdout:
    """Which training images are held out: a ``fraction`` of them, chosen by ``seed``.

    Recorded in every checkpoint (``split`` field), so later stages can check they hold out
    the same images.
    """

    fraction: float = DEFAULT_HOLDOUT_FRACTION
    seed: int = DEFAULT_HOLDOUT_SEED

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise PranceError(f"holdout fraction {self.fraction} must be in (0, 1); use e.g. 0.1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Holdout":
        return cls(fraction=float(d["fraction"]), seed=int(d["seed"]))

    def indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ascending positions ``(train, holdout)`` of a training split of ``n`` images."""
        n_holdout = round(n * self.fraction)
        if not 0 < n_holdout < n:
            raise PranceError(f"a holdout fraction of {self.fraction} of {n} images leaves an empty part; "
                              "use another fraction or more data")
        order = permutation(n, self.seed)
        return order[n_holdout:].sort().values, order[:n_holdout].sort().values

    def split(self, dataset: IndexedDataset) -> tuple[IndexedDataset, IndexedDataset]:
        """``(train, holdout)`` views of a whole training split."""
        train, held = self.indices(len(dataset))
        return dataset.select(train), dataset.select(held)


def permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` fixed by ``seed`` alone (not by the global RNG state)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def subset(dataset: IndexedDataset, limit: int | None, seed: int) -> IndexedDataset:
    """A seeded random ``limit`` samples of ``dataset`` in storage order (all of it for None).

    Random, not a prefix: a prefix of a folder holds only its first classes.
    """
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise PranceError(f"limit={limit} must be a positive number of samples; use e.g. --limit 1000")
    return dataset.select(permutation(len(dataset), seed)[:limit].sort().values)


@dataclass
class TrainingSplits:
    """The two parts of the training split a training or selection command may read."""

    train: IndexedDataset
    """Images the model learns from (augmented if asked)."""
    holdout: IndexedDataset
    """Held-out training images, never augmented: every choice is made on them."""
    holdout_spec: Holdout

    def record(self, data: str) -> dict[str, Any]:
        """What a checkpoint stores about the split it was trained and selected on."""
        return {"data": data, "holdout": self.holdout_spec.to_dict(), "train_images": len(self.train),
                "holdout_images": len(self.holdout), "classes": list(self.train.info.class_names)}


def training_splits(
    name: str,
    *,
    img_size: int,
    in_chans: int,
    holdout: Holdout = Holdout(),
    train_augment: bool = True,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    holdout_limit: int | None = None,
    seed: int = 0,
) -> TrainingSplits:
    """The training part (``limit`` random images of it) and the holdout (``holdout_limit`` of it).

    The holdout is split off the whole training split first, so it is the same for every
    ``limit``; ``seed`` only chooses which images a limit keeps.
    """
    from prance.data import build_dataset  # the package entry point builds datasets

    def whole(augment: bool) -> IndexedDataset:
        return build_dataset(name, "train", img_size=img_size, in_chans=in_chans, train_augment=augment, root=root)

    augmented = whole(train_augment)
    train_idx, held_idx = holdout.indices(len(augmented))
    plain = whole(False) if train_augment else augmented
    train = subset(augmented.select(train_idx), limit, seed)
    held = subset(plain.select(held_idx), holdout_limit, seed)
    return TrainingSplits(train, held, holdout)


def holdout_set(
    name: str,
    *,
    img_size: int,
    in_chans: int,
    holdout: Holdout = Holdout(),
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> IndexedDataset:
    """The held-out training images alone (``limit`` random ones of them), never augmented: what choices read."""
    from prance.data import build_dataset

    plain = build_dataset(name, "train", img_size=img_size, in_chans=in_chans, train_augment=False, root=root)
    return subset(plain.select(holdout.indices(len(plain))[1]), limit, seed)


def final_test_set(
    name: str,
    *,
    img_size: int,
    in_chans: int,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> IndexedDataset:
    """The test split (Fashion-MNIST's test set, a folder's ``val/``): for final evaluation and reports only."""
    from prance.data import build_dataset

    test = build_dataset(name, "test", img_size=img_size, in_chans=in_chans, train_augment=False, root=root)
    return subset(test, limit, seed)


__all__ = ["DEFAULT_HOLDOUT_FRACTION", "DEFAULT_HOLDOUT_SEED", "Holdout", "TrainingSplits", "permutation",
           "final_test_set", "holdout_set", "subset", "training_splits"]
