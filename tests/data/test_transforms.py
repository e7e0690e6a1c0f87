"""Fashion-MNIST's tensor transforms (channels, resizing, augmentation) and check_images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prance.data.fashion_mnist import FashionMNIST
from prance.data.transforms import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    TensorImageTransform,
    check_images,
    crop_padding,
)

GREY = ((0.5,), (0.25,))


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * FASHION_MNIST_STD + FASHION_MNIST_MEAN


def test_grey_is_replicated_for_three_channel_models(small_fmnist_dir: Path) -> None:
    grey = FashionMNIST("test", in_chans=1, data_dir=small_fmnist_dir)
    rgb = FashionMNIST("test", in_chans=3, data_dir=small_fmnist_dir)
    assert rgb.info.in_chans == 3 and rgb.info.mean == (FASHION_MNIST_MEAN,) * 3
    x1, x3 = grey[5][0], rgb[5][0]
    assert x3.shape == (3, 28, 28)
    for channel in x3:
        assert torch.equal(channel, x1[0])


@pytest.mark.parametrize("train_augment", [False, True])
def test_28px_images_are_resized_for_224px_models(
    small_fmnist_dir: Path, train_augment: bool
) -> None:
    native = FashionMNIST("test", data_dir=small_fmnist_dir)
    big = FashionMNIST(
        "test", img_size=224, in_chans=3, train_augment=train_augment, data_dir=small_fmnist_dir
    )
    x = torch.stack([big[i][0] for i in range(8)])
    assert x.shape == (8, 3, 224, 224) and x.dtype == torch.float32
    check_images(x, in_chans=3, img_size=224)
    if not train_augment:  # resizing keeps the picture: same brightness, same shapes
        small = unnormalise(torch.stack([native[i][0] for i in range(8)]))
        back = F.interpolate(unnormalise(x[:, :1]), size=28, mode="area")
        torch.testing.assert_close(back.mean((1, 2, 3)), small.mean((1, 2, 3)), atol=1e-4, rtol=0)
        assert torch.corrcoef(torch.stack([back.flatten(), small.flatten()]))[0, 1] > 0.97


def window(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    crop = image[:, dy : dy + 28, dx : dx + 28]
    return crop.flip(-1) if flip else crop


def test_padded_crop_is_a_shift_or_mirror_of_the_image() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    out = TensorImageTransform(28, 1, True, *GREY)(images)
    assert out.shape == (16, 1, 28, 28)
    pad = crop_padding(28)
    padded = F.pad(images.float() / 255, (pad,) * 4)
    seen = set()
    for image, result in zip(padded, out * 0.25 + 0.5, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.allclose(window(image, dy, dx, flip), result, atol=1e-6)
        ]
        assert matches, "augmented image is not a crop of the padded original"
        seen.add(matches[0])
    assert len(seen) > 4, "every image got the same crop"


def test_random_resized_crop_stays_inside_the_image_and_flips() -> None:
    # Brightness grows left to right, so each output row shows which columns were cut out.
    ramp = torch.linspace(0, 255, 28).round().to(torch.uint8).expand(64, 1, 28, 28)
    torch.manual_seed(1)
    out = TensorImageTransform(96, 1, True, *GREY)(ramp) * 0.25 + 0.5
    assert out.shape == (64, 1, 96, 96)
    rows = out[:, 0, 48]
    steps = rows.diff(dim=-1)
    rising, falling = (steps >= -1e-6).all(-1), (steps <= 1e-6).all(-1)
    assert bool((rising | falling).all()), "a crop must be one window, possibly mirrored"
    assert rising.any() and falling.any()
    span = rows.amax(-1) - rows.amin(-1)
    # A crop covers at least sqrt(0.6 * 3/4) of the width and never leaves the image.
    assert bool((span > 0.55).all()) and bool((rows >= -1e-6).all() and (rows <= 1 + 1e-6).all())


def test_augmentation_follows_the_torch_seed_and_eval_is_fixed() -> None:
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    train = TensorImageTransform(28, 1, True, *GREY)
    torch.manual_seed(3)
    first = train(images)
    torch.manual_seed(3)
    assert torch.equal(first, train(images))
    assert not torch.equal(first, train(images))
    evaluate = TensorImageTransform(28, 1, False, *GREY)
    assert torch.equal(evaluate(images), evaluate(images))


def test_unsupported_channel_count_is_rejected(prance_error) -> None:
    with prance_error("in_chans=2", "use 1 (grey) or 3 (RGB)"):
        TensorImageTransform(28, 2, False, *GREY)


def test_check_images_accepts_a_good_batch_or_image() -> None:
    check_images(torch.zeros(4, 3, 32, 32), in_chans=3, img_size=32)
    check_images(torch.zeros(1, 28, 28), in_chans=1, img_size=28)


@pytest.mark.parametrize(
    ("images", "fragments"),
    [
        (torch.zeros(2, 1, 28, 28), ("1 channel(s)", "expects 3", "in_chans=3", "model with in_chans=1")),
        (torch.zeros(2, 3, 32, 32), ("32x32", "expects 28x28", "resize to 28x28", "--img-size 32")),
        (
            torch.zeros(2, 3, 28, 28).index_fill_(3, torch.tensor([0]), float("nan")),
            ("168 NaN/Inf",),
        ),
        (torch.full((3, 28, 28), float("inf")), ("NaN/Inf",)),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), ("torch.uint8", "float")),
        (torch.zeros(3, 28), ("shape (3, 28)", "[B, C, H, W]")),
    ],
    ids=["channels", "size", "nan", "inf", "uint8", "rank"],
)
def test_check_images_names_the_problem_and_fix(
    prance_error, images: torch.Tensor, fragments: tuple[str, ...]
) -> None:
    with prance_error(*fragments):
        check_images(images, in_chans=3, img_size=28)
