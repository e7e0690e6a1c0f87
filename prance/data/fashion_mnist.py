"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

The whole split is held in memory as uint8 tensors (47 MB for training), and samples
are transformed in batches with tensor ops, so data loading never limits training on CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prance.data.base import DatasetInfo, IndexedDataset, Sample, as_index
from prance.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TensorImageTransform
from prance.errors import PranceError

ENV_VAR = "PRANCE_FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NATIVE_SIZE = 28
# File stems per split, as the package ships them (each with or without ".gz").
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IMAGES_STEM = "{}-images-idx3-ubyte"
LABELS_STEM = "{}-labels-idx1-ubyte"
IDX_UBYTE = 0x08

_REINSTALL = (
    f"reinstall with `sudo apt-get install --reinstall {DEBIAN_PACKAGE}` "
    f"or point {ENV_VAR} to a good copy"
)


def _dpkg_dir() -> Path | None:
    """Where dpkg installed the package, if dpkg exists and knows it."""
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return None
    try:
        listing = subprocess.run(
            [dpkg, "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    marker = IMAGES_STEM.format("train") + ".gz"
    for line in listing.stdout.splitlines():
        path = Path(line.strip())
        if path.name == marker:
            return path.parent
    return None


def find_fashion_mnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory to read from: the argument, then $PRANCE_FASHION_MNIST_DIR, then
    dpkg's record of the package, then its default path.

    An explicit choice (argument or variable) is never overridden, so a wrong one fails
    loudly instead of silently reading another copy.
    """
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return _dpkg_dir() or DEFAULT_DIR


def _locate_file(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise PranceError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}; "
        f"install it with `sudo apt-get install {DEBIAN_PACKAGE}` "
        f"or set {ENV_VAR} / --data-dir to a directory holding the IDX files"
    )


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip or plain) into an array with ``ndim`` dims.

    Every inconsistency between header and payload is an error: a short download or a
    damaged file must never turn into silently wrong training data.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise PranceError(f"{path} is truncated or corrupt ({exc}); {_REINSTALL}") from exc
    if len(raw) < 4:
        raise PranceError(f"{path} is truncated ({len(raw)} bytes, no IDX header); {_REINSTALL}")
    if raw[0] or raw[1] or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise PranceError(
            f"{path} has magic number 0x{raw[:4].hex()}, expected 0x0000{IDX_UBYTE:02x}{ndim:02x} "
            f"(unsigned-byte IDX with {ndim} dims); {_REINSTALL}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PranceError(f"{path} is truncated inside its IDX header; {_REINSTALL}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    found = len(raw) - header
    if found != expected:
        problem = "truncated" if found < expected else "corrupt (trailing data)"
        raise PranceError(
            f"{path} is {problem}: header {dims} needs {expected} data bytes, "
            f"found {found}; {_REINSTALL}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_once(path: Path, ndim: int) -> np.ndarray:
    """:func:`read_idx`, decompressed once per process for the same file contents (``prance run`` reads the
    same files in every stage; hashing the compressed bytes costs a tenth of decompressing them)."""
    try:
        key = (hashlib.blake2b(path.read_bytes(), digest_size=16).digest(), ndim)
    except OSError:
        return read_idx(path, ndim)  # reports the problem
    if key not in _DECODED:
        if len(_DECODED) >= 4:
            _DECODED.pop(next(iter(_DECODED)))
        _DECODED[key] = read_idx(path, ndim)
    return _DECODED[key]


#: Decoded IDX arrays (read-only views) by the hash of their file's bytes; the two splits' images and labels.
_DECODED: dict[tuple[bytes, int], np.ndarray] = {}


def load_fashion_mnist(
    split: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of the "train" or "test" split."""
    if split not in SPLIT_PREFIX:
        raise PranceError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = find_fashion_mnist_dir(data_dir)
    prefix = SPLIT_PREFIX[split]
    images_path = _locate_file(directory, IMAGES_STEM.format(prefix))
    labels_path = _locate_file(directory, LABELS_STEM.format(prefix))
    images = _read_idx_once(images_path, ndim=3)
    labels = _read_idx_once(labels_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise PranceError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; {_REINSTALL}"
        )
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise PranceError(
            f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, "
            f"Fashion-MNIST is {NATIVE_SIZE}x{NATIVE_SIZE}; {_REINSTALL}"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise PranceError(
            f"{labels_path} has label {int(labels.max())}, Fashion-MNIST has "
            f"{len(CLASS_NAMES)} classes; {_REINSTALL}"
        )
    # frombuffer views are read-only; copy once into tensors we own.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(IndexedDataset):
    """One Fashion-MNIST split, in memory, yielding (float32 [C, S, S], int64 label).

    ``indices`` (a sequence or a slice) restricts the view to some samples without
    copying the images, like ``select``.
    """

    def __init__(
        self,
        split: str,
        *,
        img_size: int = NATIVE_SIZE,
        in_chans: int = 1,
        train_augment: bool = False,
        data_dir: str | os.PathLike[str] | None = None,
        indices: Sequence[int] | slice | None = None,
    ) -> None:
        mean = (FASHION_MNIST_MEAN,) * in_chans
        std = (FASHION_MNIST_STD,) * in_chans
        self.transform = TensorImageTransform(img_size, in_chans, train_augment, mean, std)
        self._images, self._labels = load_fashion_mnist(split, data_dir)
        self._index = torch.arange(len(self._labels))
        self.info = DatasetInfo(
            name="fashion-mnist",
            split=split,
            class_names=CLASS_NAMES,
            in_chans=in_chans,
            img_size=img_size,
            mean=mean,
            std=std,
        )
        if indices is not None:
            self._index = self._index[as_index(indices)]

    def __getitem__(self, i: int) -> Sample:
        images, labels = self._batch(torch.tensor([i]))
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """Batched fetch used by DataLoader: one vectorised transform per batch."""
        images, labels = self._batch(torch.tensor(indices, dtype=torch.long))
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))

    def _batch(self, positions: torch.Tensor) -> Sample:
        rows = self._index[positions]
        return self.transform(self._images[rows].unsqueeze(1)), self._labels[rows]
