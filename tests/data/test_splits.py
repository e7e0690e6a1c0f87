"""Where every number comes from: the holdout is carved from the whole training split, once."""

from __future__ import annotations

from pathlib import Path

import torch

from prance.data.splits import Holdout, final_test_set, holdout_set, training_splits


def _rows(dataset) -> set[int]:
    """Storage rows a view reads (independent of how the view was built)."""
    return set(dataset._index.tolist())


def test_the_holdout_is_the_same_whatever_the_training_limit(small_fmnist_dir: Path) -> None:
    common = dict(img_size=28, in_chans=1, root=small_fmnist_dir, holdout=Holdout(0.25, seed=3))
    whole = training_splits("fashion-mnist", **common)
    limited = training_splits("fashion-mnist", **common, limit=10, seed=5)
    # A seeded permutation of the 64 images, independently: its first quarter is held out.
    expected = set(torch.randperm(64, generator=torch.Generator().manual_seed(3))[:16].tolist())
    assert _rows(whole.holdout) == _rows(limited.holdout) == expected
    assert _rows(whole.train) == set(range(64)) - expected
    assert len(limited.train) == 10 and _rows(limited.train) <= _rows(whole.train)
    # Training images are augmented, held-out ones never; selection commands read the same holdout.
    assert whole.train.transform.train_augment and not whole.holdout.transform.train_augment
    assert _rows(holdout_set("fashion-mnist", **common)) == expected
    record = whole.record("fashion-mnist")
    assert record["holdout"] == {"fraction": 0.25, "seed": 3} and record["holdout_images"] == 16


def test_the_test_split_is_another_file(small_fmnist_dir: Path) -> None:
    test = final_test_set("fashion-mnist", img_size=28, in_chans=1, root=small_fmnist_dir)
    assert test.info.split == "test" and not test.transform.train_augment
