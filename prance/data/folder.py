"""ImageNet-layout folders: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

The scan checks the layout up front (missing splits, empty or mismatched class folders,
zero-byte files) so that a bad dataset fails before training, not hours into it.
Decoding errors can only be seen when a file is read, and are reported by name then.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from prance.data.base import DatasetInfo, IndexedDataset, Sample
from prance.data.transforms import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_model_input,
    folder_transform,
)
from prance.errors import PranceError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SPLITS = ("train", "val")
# Mean and std per model channel count: ImageNet's for RGB, their grey version for L.
NORMALISATION = {3: (IMAGENET_MEAN, IMAGENET_STD), 1: (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)}
LAYOUT = "expected root/train/<class>/<image> and root/val/<class>/<image>"


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names; hidden entries (.git, .ipynb_checkpoints) are not classes."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _name_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _image_files(class_dir: Path) -> list[Path]:
    """Sorted image files of one class; a zero-byte file is an error, other files are skipped."""
    files = []
    with os.scandir(class_dir) as entries:
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if entry.name.startswith(".") or suffix not in IMAGE_EXTENSIONS or not entry.is_file():
                continue
            if entry.stat().st_size == 0:
                raise PranceError(f"image {entry.path} is empty (0 bytes); replace or delete it")
            files.append(Path(entry.path))
    if not files:
        raise PranceError(
            f"class folder {class_dir} has no images ({'/'.join(sorted(IMAGE_EXTENSIONS))}); "
            "add images or remove the folder"
        )
    return sorted(files)


def scan_split(root: Path, split: str) -> tuple[tuple[str, ...], list[Path], list[int]]:
    """Class names, image paths and labels of one split, after checking the layout."""
    if split not in SPLITS:
        raise PranceError(f"unknown folder split {split!r}; use 'train' or 'val'")
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise PranceError(f"dataset root {root} {problem}; {LAYOUT}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise PranceError(f"{split_dir} does not exist; {LAYOUT}")
    classes = _class_dirs(split_dir)
    if not classes:
        raise PranceError(f"{split_dir} has no class folders; {LAYOUT}")
    other_dir = root / SPLITS[1 - SPLITS.index(split)]
    if other_dir.is_dir():
        other = _class_dirs(other_dir)
        if other != classes:
            only_here = sorted(set(classes) - set(other))
            only_there = sorted(set(other) - set(classes))
            raise PranceError(
                f"class folders differ between {split_dir} and {other_dir}: "
                f"only in {split}: [{_name_list(only_here)}], "
                f"only in {other_dir.name}: [{_name_list(only_there)}]; "
                "give both splits the same class folders"
            )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = _image_files(split_dir / name)
        paths += files
        labels += [label] * len(files)
    return tuple(classes), paths, labels


def image_shape(root: str | os.PathLike[str]) -> tuple[int, int]:
    """``(shorter side, channels)`` of the first training image: the input a model trained from scratch
    on this folder can take (1 channel for grey images, else 3)."""
    split_dir = Path(root) / SPLITS[0]
    if not split_dir.is_dir():
        raise PranceError(f"{split_dir} does not exist; {LAYOUT}")
    classes = _class_dirs(split_dir)
    if not classes:
        raise PranceError(f"{split_dir} has no class folders; {LAYOUT}")
    first = _image_files(split_dir / classes[0])[0]
    try:
        with Image.open(first) as img:
            return min(img.size), 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except (OSError, ValueError, SyntaxError) as exc:
        raise PranceError(f"cannot read image {first} ({exc}); replace or delete the file") from exc


class ImageFolder(IndexedDataset):
    """One split of an ImageNet-layout folder, yielding (float32 [C, S, S], int64 label).

    Images of any size and mode are converted to the model's mode (RGB for
    ``in_chans=3``, L for 1) and resized to ``img_size``; labels follow sorted class names.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        img_size: int,
        in_chans: int = 3,
        train_augment: bool = False,
    ) -> None:
        check_model_input(img_size, in_chans)  # before a possibly long scan
        mean, std = NORMALISATION[in_chans]
        self.transform = folder_transform(img_size, train_augment, mean, std)
        self.mode = "RGB" if in_chans == 3 else "L"
        class_names, self._paths, labels = scan_split(Path(root), split)
        self._labels = torch.tensor(labels, dtype=torch.long)
        self._index = torch.arange(len(labels))
        self.info = DatasetInfo(
            name="folder",
            split=split,
            class_names=class_names,
            in_chans=in_chans,
            img_size=img_size,
            mean=mean,
            std=std,
        )

    def __getitem__(self, i: int) -> Sample:
        row = int(self._index[i])
        return self.transform(self._load(self._paths[row])), self._labels[row]

    def _load(self, path: Path) -> Image.Image:
        """Decode fully now (convert forces it) so a damaged file fails here, by name."""
        try:
            with Image.open(path) as img:
                return img.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as exc:
            raise PranceError(
                f"cannot read image {path} ({exc}); replace or delete the file"
            ) from exc
