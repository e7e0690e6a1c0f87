"""Shared fixtures: small IDX copies of the real Fashion-MNIST files, generated image
folders, and a checker for PranceError messages."""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prance.data.fashion_mnist import ENV_VAR, find_fashion_mnist_dir
from prance.errors import PranceError

SMALL_N = 64
# One colour per class, so a test can tell from the pixels which folder an image came from.
CLASS_COLOURS = {"cat": (220, 30, 30), "dog": (30, 200, 40), "frog": (20, 40, 210)}


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def read_raw(path: Path, header: int) -> np.ndarray:
    """The bytes after an IDX header, parsed independently of the code under test."""
    return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=header)


@pytest.fixture
def idx_writer() -> Callable[[Path, np.ndarray], None]:
    """``write_idx`` for tests that build their own (possibly damaged) IDX files."""
    return write_idx


@pytest.fixture(autouse=True)
def _no_user_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own PRANCE_FASHION_MNIST_DIR must not change what tests read."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    directory = find_fashion_mnist_dir()
    if not (directory / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist")
    return directory


@pytest.fixture(scope="session")
def fmnist_test_raw(fmnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real test split as (uint8 [10000, 28, 28], uint8 [10000])."""
    images = read_raw(fmnist_dir / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_raw(fmnist_dir / "t10k-labels-idx1-ubyte.gz", 8)
    return images, labels


@pytest.fixture
def small_fmnist_dir(tmp_path: Path, fmnist_test_raw: tuple[np.ndarray, np.ndarray]) -> Path:
    """Both splits as the first SMALL_N real test images, in gzip IDX files."""
    images, labels = fmnist_test_raw
    directory = tmp_path / "fmnist"
    directory.mkdir()
    for prefix in ("train", "t10k"):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images[:SMALL_N])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels[:SMALL_N])
    return directory


def save_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], mode: str) -> None:
    """A flat-colour image (converted to ``mode``) in the format its extension names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour).convert(mode)
    image.save(path)


@pytest.fixture
def class_colours() -> dict[str, tuple[int, int, int]]:
    return CLASS_COLOURS


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """root/{train,val}/{cat,dog,frog}/ with mixed sizes, modes and extension cases.

    train holds 3 + 2 + 2 images in sorted order cat/a.png, cat/b.JPG, cat/c.Png (RGBA),
    dog/a.jpeg (grey), dog/b.bmp, frog/a.webp, frog/b.jpg; val holds one PNG per class.
    """
    root = tmp_path / "images"
    layout = {
        "train": {
            "cat": [
                ("a.png", (40, 30), "RGB"),
                ("b.JPG", (33, 50), "RGB"),
                ("c.Png", (64, 64), "RGBA"),
            ],
            "dog": [("a.jpeg", (20, 20), "L"), ("b.bmp", (100, 37), "RGB")],
            "frog": [("a.webp", (32, 32), "RGB"), ("b.jpg", (45, 45), "RGB")],
        },
        "val": {name: [("v.png", (32, 32), "RGB")] for name in CLASS_COLOURS},
    }
    for split, classes in layout.items():
        for name, files in classes.items():
            for filename, size, mode in files:
                save_image(root / split / name / filename, size, CLASS_COLOURS[name], mode)
    # Ignored: a non-image file, a hidden (even empty) image, a hidden folder.
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".hidden.png").write_bytes(b"")
    (root / "train" / ".cache").mkdir()
    return root


@pytest.fixture
def prance_error() -> Callable[..., AbstractContextManager[None]]:
    """``with prance_error("fragment", ...):`` expects a one-line PranceError naming each
    fragment, since the CLI prints exactly that line to the user."""

    @contextmanager
    def check(*fragments: str) -> Iterator[None]:
        with pytest.raises(PranceError) as info:
            yield
        message = str(info.value)
        assert "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, message

    return check
