"""ImageNet-layout folders: scanning, colour modes, resizing, and layout errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from prance.data.folder import ImageFolder
from prance.data.transforms import (
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

Colours = dict[str, tuple[int, int, int]]


def unnormalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


def test_classes_labels_and_any_image_size(image_root: Path, class_colours: Colours) -> None:
    dataset = ImageFolder(image_root, "train", img_size=32)
    assert dataset.info.class_names == ("cat", "dog", "frog")
    assert dataset.info.mean == IMAGENET_MEAN and dataset.info.std == IMAGENET_STD
    # Upper-case and mixed-case extensions count; notes.txt, hidden files and folders do not.
    assert dataset.targets.tolist() == [0, 0, 0, 1, 1, 2, 2]
    for i in (0, 1, 2, 4, 5, 6):  # the colour images: pixels show the class folder
        x, y = dataset[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        colour = unnormalise(x, IMAGENET_MEAN, IMAGENET_STD).mean((1, 2)) * 255
        expected = torch.tensor(
            class_colours[dataset.info.class_names[int(y)]], dtype=torch.float32
        )
        torch.testing.assert_close(colour, expected, atol=6.0, rtol=0)  # JPEG is lossy


def test_grey_image_is_replicated_for_rgb_models(image_root: Path) -> None:
    x, _ = ImageFolder(image_root, "train", img_size=32)[3]  # dog/a.jpeg, mode L
    pixels = unnormalise(x, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[1], pixels[2], atol=1e-5, rtol=0)


def test_rgb_images_become_grey_for_one_channel_models(
    image_root: Path, class_colours: Colours
) -> None:
    dataset = ImageFolder(image_root, "val", img_size=16, in_chans=1)
    assert dataset.info.mean == IMAGENET_GREY_MEAN and dataset.info.std == IMAGENET_GREY_STD
    x, _ = dataset[0]
    assert x.shape == (1, 16, 16)
    r, g, b = class_colours["cat"]
    luma = (0.299 * r + 0.587 * g + 0.114 * b) / 255
    assert abs(unnormalise(x, IMAGENET_GREY_MEAN, IMAGENET_GREY_STD).mean().item() - luma) < 2 / 255


@pytest.mark.parametrize("img_size", [32, 80])  # padded crop / RandomResizedCrop
def test_train_augmentation_keeps_the_model_shape(image_root: Path, img_size: int) -> None:
    dataset = ImageFolder(image_root, "train", img_size=img_size, train_augment=True)
    for i in range(len(dataset)):
        x, _ = dataset[i]
        assert x.shape == (3, img_size, img_size) and torch.isfinite(x).all()


def test_missing_root_is_reported(prance_error, tmp_path: Path) -> None:
    with prance_error(str(tmp_path / "nowhere"), "root/train/<class>/<image>"):
        ImageFolder(tmp_path / "nowhere", "train", img_size=32)


def test_missing_split_is_reported(prance_error, image_root: Path) -> None:
    shutil.rmtree(image_root / "val")
    ImageFolder(image_root, "train", img_size=32)  # train alone is usable
    with prance_error(str(image_root / "val"), "does not exist", "root/val/<class>/<image>"):
        ImageFolder(image_root, "val", img_size=32)


def test_split_without_class_folders_is_reported(prance_error, tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with prance_error(str(tmp_path / "train"), "no class folders"):
        ImageFolder(tmp_path, "train", img_size=32)


def test_class_folder_without_images_is_reported(prance_error, image_root: Path) -> None:
    for image in (image_root / "val" / "dog").iterdir():
        image.unlink()
    (image_root / "val" / "dog" / "readme.txt").write_text("no images here")
    with prance_error(str(image_root / "val" / "dog"), "has no images"):
        ImageFolder(image_root, "val", img_size=32)


def test_differing_class_folders_are_named(prance_error, image_root: Path) -> None:
    (image_root / "train" / "frog").rename(image_root / "train" / "toad")
    with prance_error("only in train: [toad]", "only in val: [frog]", "same class folders"):
        ImageFolder(image_root, "train", img_size=32)


def test_zero_byte_image_fails_at_scan_time(prance_error, image_root: Path) -> None:
    empty = image_root / "train" / "cat" / "empty.png"
    empty.write_bytes(b"")
    with prance_error(str(empty), "0 bytes"):
        ImageFolder(image_root, "train", img_size=32)


def test_corrupt_image_fails_when_loaded_and_names_the_file(prance_error, image_root: Path) -> None:
    broken = image_root / "val" / "frog" / "v.png"
    broken.write_bytes(broken.read_bytes()[:60])
    dataset = ImageFolder(image_root, "val", img_size=32)  # the scan only sees sizes
    dataset[0]
    with prance_error(str(broken), "cannot read image", "replace or delete"):
        dataset[2]
