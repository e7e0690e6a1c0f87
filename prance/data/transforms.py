"""What the model sees: normalisation constants, image transforms and an input check.

Fashion-MNIST lives in memory as uint8 tensors, so its transform works on whole batches
with tensor ops (no PIL per item). Image folders decode one file at a time with PIL, so
they use torchvision's PIL-aware transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from prance.errors import PranceError

# Measured on the 60k Fashion-MNIST training images (pixels scaled to [0, 1]).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet statistics weighted like PIL's RGB -> L conversion (0.299 R + 0.587 G + 0.114 B),
# for folders of colour images fed to a one-channel model; the std treats the channels as
# fully correlated, which natural images nearly are.
IMAGENET_GREY_MEAN = (0.4590,)
IMAGENET_GREY_STD = (0.2256,)

# Up to this size images count as "small": augment by padded random crops, which keep
# the whole object; larger ones use RandomResizedCrop as in DeiT training.
SMALL_IMAGE_MAX = 64
RRC_SCALE = (0.6, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def check_model_input(img_size: int, in_chans: int) -> None:
    """Reject image sizes and channel counts no transform here can produce."""
    if in_chans not in (1, 3):
        raise PranceError(f"in_chans={in_chans} is not supported; use 1 (grey) or 3 (RGB)")
    if img_size < 1:
        raise PranceError(f"img_size={img_size} is not positive; pass e.g. --img-size 28")


def crop_padding(img_size: int) -> int:
    """Padding of the random crop for small images: an eighth of the side (4 px at 32)."""
    return max(1, img_size // 8)


class TensorImageTransform:
    """Batched uint8 [B, C, H, W] -> normalised float32 [B, in_chans, S, S].

    C is in_chans, or 1 for grey images that a 3-channel model sees replicated.
    Every step is a tensor op over the whole batch, with independent random draws per
    image, so a DataLoader batch costs a handful of kernels instead of B PIL round trips.
    Randomness comes from torch's global generator (seeded per DataLoader worker).
    """

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        train_augment: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        check_model_input(img_size, in_chans)
        self.img_size = img_size
        self.in_chans = in_chans
        self.train_augment = train_augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        if self.train_augment and self.img_size > SMALL_IMAGE_MAX:
            x = self._random_resized_crop_flip(x)
        else:
            if x.shape[-2:] != (self.img_size, self.img_size):
                x = F.interpolate(
                    x,
                    size=(self.img_size, self.img_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
            if self.train_augment:
                x = self._random_flip(self._padded_random_crop(x))
        if self.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def _padded_random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad each side, then cut an img_size window at a random offset per image."""
        b, _, h, w = x.shape
        pad = crop_padding(self.img_size)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b, 1))
        dx = torch.randint(0, 2 * pad + 1, (b, 1))
        rows = dy + torch.arange(h)  # [B, H]
        cols = dx + torch.arange(w)  # [B, W]
        batch = torch.arange(b).view(b, 1, 1)
        # Advanced indices around the channel slice put the channel last: [B, H, W, C].
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    @staticmethod
    def _random_flip(x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0]) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def _random_resized_crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop + flip as one affine resampling per image.

        Area and aspect ratio are drawn as in torchvision; instead of retrying draws that
        do not fit, the crop's sides are clipped to the image.
        """
        b = x.shape[0]
        area = torch.empty(b).uniform_(*RRC_SCALE)
        log_ratio = torch.empty(b).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
        ratio = torch.exp(log_ratio)
        # Crop side / image side; in affine_grid's [-1, 1] coordinates it is the half-side.
        frac_w = torch.sqrt(area * ratio).clamp(max=1.0)
        frac_h = torch.sqrt(area / ratio).clamp(max=1.0)
        # Centres chosen so that the crop stays inside the image.
        cx = (torch.rand(b) * 2 - 1) * (1 - frac_w)
        cy = (torch.rand(b) * 2 - 1) * (1 - frac_h)
        sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = frac_w * sign
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = frac_h
        theta[:, 1, 2] = cy
        size = [b, x.shape[1], self.img_size, self.img_size]
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def folder_transform(
    img_size: int,
    train_augment: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float32 [in_chans, img_size, img_size].

    The image may have any size but must already be in the model's mode (RGB or L).
    """
    if train_augment and img_size > SMALL_IMAGE_MAX:
        geometry = [v2.RandomResizedCrop(img_size, scale=RRC_SCALE, ratio=RRC_RATIO)]
    else:
        # Shorter side to img_size, then the central square: no-op for images of that size.
        geometry = [v2.Resize(img_size), v2.CenterCrop(img_size)]
        if train_augment:
            geometry.append(v2.RandomCrop(img_size, padding=crop_padding(img_size)))
    if train_augment:
        geometry.append(v2.RandomHorizontalFlip())
    return v2.Compose(
        [
            *geometry,
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def check_images(x: torch.Tensor, in_chans: int, img_size: int) -> None:
    """Fail early, with the fix, on a batch the model cannot use.

    Accepts [C, H, W] or [B, C, H, W] float tensors.
    """
    if x.dim() not in (3, 4):
        raise PranceError(
            f"images have shape {tuple(x.shape)}, expected [B, C, H, W] or [C, H, W]; "
            "add or remove the batch dimension"
        )
    if not x.is_floating_point():
        raise PranceError(
            f"images have dtype {x.dtype}, expected a float tensor; "
            "convert and normalise them (build_dataset does this)"
        )
    channels, height, width = x.shape[-3:]
    if channels != in_chans:
        raise PranceError(
            f"images have {channels} channel(s) but the model expects {in_chans}; "
            f"build the dataset with in_chans={in_chans} or a model with in_chans={channels}"
        )
    if (height, width) != (img_size, img_size):
        raise PranceError(
            f"images are {height}x{width} but the model expects {img_size}x{img_size}; "
            f"resize to {img_size}x{img_size} or use --img-size {height}"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise PranceError(
            f"images contain {bad} NaN/Inf pixel value(s); "
            "check the source images and the normalisation std (must be non-zero)"
        )
