"""What data a checkpoint was trained on, so every command reads that data unless told otherwise.

A model is only meaningful on the classes it learned: evaluating a model trained on a 3-class
folder against Fashion-MNIST's 10 labels reports a number that means nothing. So ``evaluate``,
``sweep``, ``visualize`` and ``bench`` default to the checkpoint's data set (and its folder),
build the transform for the model's own image size and channels, and refuse, naming both, a
data set whose classes differ.

Where a checkpoint says it: the ``split`` record (every run that trains on a holdout split;
newer ones also list the ``classes``), else its settings (``args`` of a dense run,
``args["run"]`` of a meta run). A checkpoint written without either (a bare ``save_checkpoint``)
states only its class count; without class names, only class counts can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prance.data.base import DatasetInfo, IndexedDataset
from prance.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from prance.data.splits import Holdout, final_test_set, holdout_set
from prance.errors import PranceError

#: Splits a command may read: the held-out training images (for choices) or the test split (final numbers).
EVALUATION_SPLITS = ("holdout", "test")

#: The data set a checkpoint that records none is read with.
DEFAULT_DATA = "fashion-mnist"


@dataclass(frozen=True)
class TrainedOn:
    """The data set, folder, classes and holdout a checkpoint's model was trained on."""

    data: str | None
    """``fashion-mnist`` or ``folder``; None when the checkpoint does not say."""
    data_dir: str | None
    """The Fashion-MNIST folder or the folder root given to training (None: the default location)."""
    num_classes: int
    """Classes of the model's head (always known: the checkpoint's config)."""
    class_names: tuple[str, ...] | None
    """Class names in label order, when the checkpoint records them (or the data set fixes them)."""
    holdout: Holdout | None
    """Which training images were held out, when the checkpoint records it."""

    def where(self) -> str:
        """``folder /data/pets`` or ``fashion-mnist``: how messages name the data set."""
        if self.data is None:
            return "an unrecorded data set"
        return self.data + (f" {self.data_dir}" if self.data == "folder" and self.data_dir else "")


def trained_on(ckpt: Mapping[str, Any]) -> TrainedOn:
    """What ``ckpt`` (a loaded prance checkpoint) says about the data it was trained on."""
    split = dict(ckpt.get("split") or {})
    args = dict(ckpt.get("args") or {})
    settings = dict(args["run"]) if ckpt.get("kind") == "meta" and isinstance(args.get("run"), Mapping) else args
    data = split.get("data") or settings.get("data")
    num_classes = int(ckpt["config"]["num_classes"])
    names: tuple[str, ...] | None = tuple(str(c) for c in split["classes"]) if split.get("classes") else None
    if names is None and data == "fashion-mnist":
        names = FASHION_MNIST_CLASSES
    if names is not None and len(names) != num_classes:
        names = None  # a head replaced after training (or a record of something else): trust the weights
    holdout = Holdout.from_dict(split["holdout"]) if isinstance(split.get("holdout"), Mapping) else None
    return TrainedOn(data=data, data_dir=settings.get("data_dir"), num_classes=num_classes, class_names=names,
                     holdout=holdout)


def data_source(trained: TrainedOn, data: str | None = None, data_dir: str | None = None) -> tuple[str, str | None]:
    """The data set and folder a command reads: the flags given, else the checkpoint's own.

    The checkpoint's folder is used only for its own data set (``--data folder`` alone means
    the folder it was trained on).
    """
    name = data or trained.data or DEFAULT_DATA
    if data_dir is None and name == trained.data:
        data_dir = trained.data_dir
    return name, data_dir


def check_same_classes(trained: TrainedOn, info: DatasetInfo, checkpoint: str, data_dir: str | None = None) -> None:
    """Refuse a data set whose classes are not the ones the model learned, naming both.

    Classes differ when their counts differ, or when both sides name them and the names differ.
    """
    same_count = info.num_classes == trained.num_classes
    if same_count and (trained.class_names is None or tuple(trained.class_names) == tuple(info.class_names)):
        return
    theirs = info.name + (f" {data_dir}" if info.name == "folder" and data_dir else "")
    # Names are the reason only when the counts agree; otherwise the counts say enough.
    their_names = info.class_names if same_count else None
    fix = (f"use --data {trained.data} (the data it was trained on)" if trained.data is not None
           else f"use a data set of {trained.num_classes} classes")
    raise PranceError(f"{checkpoint} was trained on {trained.where()} "
                      f"({_classes_text(trained.num_classes, trained.class_names)}), not {theirs} "
                      f"({_classes_text(info.num_classes, their_names)}); {fix} or pass a checkpoint trained on "
                      f"{theirs}")


def checkpoint_dataset(
    ckpt: Mapping[str, Any],
    checkpoint: str,
    *,
    split: str = "test",
    data: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> IndexedDataset:
    """The ``split`` ("test" or "holdout") of the checkpoint's data set, for its model's input shape.

    ``data`` / ``data_dir`` override the checkpoint's data set; its classes must still be the
    model's. ``limit`` keeps a seeded random subset. ``checkpoint`` names the file in errors.
    """
    if split not in EVALUATION_SPLITS:
        raise PranceError(f"unknown split {split!r}; use {' or '.join(EVALUATION_SPLITS)}")
    trained = trained_on(ckpt)
    name, root = data_source(trained, data, data_dir)
    config = ckpt["config"]
    shape = {"img_size": int(config["img_size"]), "in_chans": int(config["in_chans"])}
    if split == "test":
        dataset = final_test_set(name, **shape, root=root, limit=limit, seed=seed)
    else:
        if trained.holdout is None:
            raise PranceError(f"{checkpoint} does not record which training images it held out (written before "
                              "holdouts were recorded); use --split test")
        dataset = holdout_set(name, **shape, holdout=trained.holdout, root=root, limit=limit, seed=seed)
    check_same_classes(trained, dataset.info, checkpoint, root)
    return dataset


def _classes_text(count: int, names: tuple[str, ...] | None, shown: int = 5) -> str:
    if not names:
        return f"{count} classes"
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{count} classes: {listed}"


__all__ = ["DEFAULT_DATA", "EVALUATION_SPLITS", "TrainedOn", "check_same_classes", "checkpoint_dataset",
           "data_source", "trained_on"]
