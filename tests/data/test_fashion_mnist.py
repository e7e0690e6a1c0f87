"""Reading Fashion-MNIST: locating the files, parsing IDX, and rejecting damaged data."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from prance.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DIR,
    ENV_VAR,
    FashionMNIST,
    find_fashion_mnist_dir,
    load_fashion_mnist,
)
from prance.data.transforms import FASHION_MNIST_MEAN, FASHION_MNIST_STD

IdxWriter = Callable[[Path, np.ndarray], None]
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


def test_reads_the_balanced_10k_test_split_of_28px_images(fmnist_dir: Path) -> None:
    images, labels = load_fashion_mnist("test", fmnist_dir)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [1000] * 10


def test_normalisation_constants_are_the_training_set_statistics(fmnist_dir: Path) -> None:
    images, labels = load_fashion_mnist("train", fmnist_dir)
    assert len(labels) == 60_000
    # Exact statistics from the histogram of the 47M pixel values, in float64.
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert round(mean.item(), 4) == FASHION_MNIST_MEAN
    assert round(std.item(), 4) == FASHION_MNIST_STD


def test_class_names_follow_label_order(fmnist_dir: Path) -> None:
    assert CLASS_NAMES == (
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
    info = FashionMNIST("test", data_dir=fmnist_dir, indices=slice(0, 4)).info
    assert info.class_names == CLASS_NAMES and info.num_classes == 10


def test_item_is_the_normalised_image_and_its_label(
    fmnist_dir: Path, fmnist_test_raw: tuple[np.ndarray, np.ndarray]
) -> None:
    raw_images, raw_labels = fmnist_test_raw
    dataset = FashionMNIST("test", data_dir=fmnist_dir, indices=slice(0, 16))
    assert len(dataset) == 16
    x, y = dataset[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.item() == raw_labels[3]
    pixels = x * FASHION_MNIST_STD + FASHION_MNIST_MEAN
    torch.testing.assert_close(pixels[0], torch.from_numpy(raw_images[3] / 255).float())


def test_indices_and_select_view_the_chosen_samples(
    fmnist_dir: Path, fmnist_test_raw: tuple[np.ndarray, np.ndarray]
) -> None:
    _, raw_labels = fmnist_test_raw
    dataset = FashionMNIST("test", data_dir=fmnist_dir, indices=[10, 3, 7, 1])
    assert dataset.targets.tolist() == raw_labels[[10, 3, 7, 1]].tolist()
    view = dataset.select(slice(1, 3))  # positions are relative to the view
    assert view.targets.tolist() == raw_labels[[3, 7]].tolist()
    torch.testing.assert_close(view[0][0], dataset[1][0])
    with pytest.raises(IndexError):
        dataset[4]


def test_dataloader_batches_equal_single_items(small_fmnist_dir: Path) -> None:
    dataset = FashionMNIST("test", in_chans=3, data_dir=small_fmnist_dir)
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 28, 28) and labels.shape == (8,)
    torch.testing.assert_close(images, torch.stack([dataset[i][0] for i in range(8)]))
    assert labels.tolist() == dataset.targets[:8].tolist()


def test_explicit_dir_beats_env_var_which_beats_the_package(
    small_fmnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(small_fmnist_dir))
    assert find_fashion_mnist_dir() == small_fmnist_dir
    assert len(FashionMNIST("train")) == len(FashionMNIST("test")) == 64
    assert find_fashion_mnist_dir(tmp_path) == tmp_path


def test_dpkg_listing_locates_the_package(
    small_fmnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_dpkg = bin_dir / "dpkg"
    fake_dpkg.write_text(
        "#!/bin/sh\n"
        "echo /usr/share/doc/dataset-fashion-mnist\n"
        f"echo {small_fmnist_dir}/train-images-idx3-ubyte.gz\n"
    )
    fake_dpkg.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_fashion_mnist_dir() == small_fmnist_dir


def test_without_dpkg_the_default_path_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_fashion_mnist_dir() == DEFAULT_DIR


def test_uncompressed_idx_files_are_read_like_gzip(small_fmnist_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (TEST_IMAGES, TEST_LABELS):
        (plain / name.removesuffix(".gz")).write_bytes(
            gzip.decompress((small_fmnist_dir / name).read_bytes())
        )
    plain_images, plain_labels = load_fashion_mnist("test", plain)
    gz_images, gz_labels = load_fashion_mnist("test", small_fmnist_dir)
    assert torch.equal(plain_images, gz_images) and torch.equal(plain_labels, gz_labels)


def test_missing_files_say_how_to_install(
    prance_error, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with prance_error(
        str(tmp_path), "sudo apt-get install dataset-fashion-mnist", ENV_VAR, "--data-dir"
    ):
        FashionMNIST("train")


@pytest.mark.parametrize("damage", ["cut gzip stream", "not gzip"])
def test_damaged_gzip_names_the_file_and_the_fix(
    prance_error, small_fmnist_dir: Path, damage: str
) -> None:
    path = small_fmnist_dir / TEST_IMAGES
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "cut gzip stream" else b"\x00" * 100)
    with prance_error(str(path), "apt-get install --reinstall dataset-fashion-mnist", ENV_VAR):
        FashionMNIST("test", data_dir=small_fmnist_dir)


def test_payload_shorter_than_header_is_truncated(prance_error, small_fmnist_dir: Path) -> None:
    path = small_fmnist_dir / TEST_IMAGES
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))
    with prance_error(str(path), "truncated", "--reinstall"):
        load_fashion_mnist("test", small_fmnist_dir)


def test_bad_magic_number_is_rejected(
    prance_error, small_fmnist_dir: Path, idx_writer: IdxWriter
) -> None:
    path = small_fmnist_dir / TEST_LABELS
    idx_writer(path, np.zeros((64, 28, 28), dtype=np.uint8))  # an image file where labels belong
    with prance_error(str(path), "magic number 0x00000803", "expected 0x00000801"):
        load_fashion_mnist("test", small_fmnist_dir)


def test_image_and_label_counts_must_match(
    prance_error, small_fmnist_dir: Path, idx_writer: IdxWriter
) -> None:
    idx_writer(small_fmnist_dir / TEST_LABELS, np.zeros(63, dtype=np.uint8))
    with prance_error("64 images", "63 labels"):
        load_fashion_mnist("test", small_fmnist_dir)


def test_labels_beyond_the_ten_classes_are_rejected(
    prance_error, small_fmnist_dir: Path, idx_writer: IdxWriter
) -> None:
    idx_writer(small_fmnist_dir / TEST_LABELS, np.full(64, 10, dtype=np.uint8))
    with prance_error("label 10", "10 classes"):
        load_fashion_mnist("test", small_fmnist_dir)


def test_a_rewritten_file_is_read_again(small_fmnist_dir: Path, fmnist_test_raw, idx_writer: IdxWriter) -> None:
    """Decoded files are kept for the next read in the process, but only while their bytes are the same."""
    first = FashionMNIST("train", data_dir=small_fmnist_dir)
    images, labels = (a[64:128] for a in fmnist_test_raw)  # small_fmnist_dir holds the first 64
    idx_writer(small_fmnist_dir / "train-images-idx3-ubyte.gz", images)
    idx_writer(small_fmnist_dir / "train-labels-idx1-ubyte.gz", labels)
    second = FashionMNIST("train", data_dir=small_fmnist_dir)
    assert torch.equal(second._images, torch.from_numpy(images.copy()))
    assert torch.equal(second._labels, torch.from_numpy(labels.astype(np.int64)))
    assert not torch.equal(first._images, second._images)
