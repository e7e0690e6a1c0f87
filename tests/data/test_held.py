"""The holdout read once for calibration: the dataset's own images and labels, one batch on the device at a time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from prance.data.held import HeldBatches
from prance.training.round_up import calibrate_with_round_up
from prance.training.selector import calibrate_on
from tests.selector.test_adaptive import _adaptive


class _Counted(TensorDataset):
    """A data set that counts the images read from it."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return images, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


def test_batches_are_the_dataset_in_order_and_accuracy_counts_its_labels():
    images, labels = _data()
    held = HeldBatches(TensorDataset(images, labels), "cpu", batch_size=4)
    assert held.cached and [len(x) for x in held] == [4, 4, 2]
    assert torch.equal(torch.cat(list(held)), images) and torch.equal(held.labels, labels)
    assert torch.equal(torch.cat(held[1:]), images[4:]) and torch.equal(held[-1], images[8:])
    guesses = torch.tensor([0, 1, 2, 0, 1, 2, 1, 1, 1, 1])  # 7 of 10 right
    assert held.accuracy(guesses) == pytest.approx(70.0)
    assert held.accuracy(torch.nn.functional.one_hot(guesses, 3).float()) == pytest.approx(70.0)  # logits


def test_a_holdout_that_fits_is_read_once_and_a_larger_one_again_on_every_pass_with_the_same_batches():
    images, labels = _data()
    small = _Counted(images, labels)
    kept = HeldBatches(small, "cpu", batch_size=4, max_bytes=images.numel() * 4)
    passes = [torch.cat(list(kept)) for _ in range(3)]
    assert kept.cached and small.reads == 10  # three passes, one read
    large = _Counted(images, labels)
    streamed = HeldBatches(large, "cpu", batch_size=4, max_bytes=images.numel() * 4 - 1)
    assert not streamed.cached and large.reads == 10
    for want in passes:
        assert torch.equal(torch.cat(list(streamed)), want)
    assert large.reads == 40  # read again on each of the three passes: nothing held
    assert all(torch.equal(streamed[i], kept[i]) for i in range(-3, 3)) and torch.equal(streamed.labels, labels)
    with pytest.raises(IndexError):
        streamed[3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibration_on_cuda_holds_one_batch_of_the_holdout_on_the_device_not_all_of_it():
    net, x = _adaptive(images=8)
    net = net.cuda()
    net(x[:1].cuda())
    held = torch.randn(16384, *x.shape[1:], generator=torch.Generator().manual_seed(1))  # 48 MB
    holdout = TensorDataset(held, torch.zeros(len(held), dtype=torch.long))
    dense_macs = float(net.last.dense_macs)
    for calibrate in (lambda: calibrate_on(net.engine, net.selector, holdout, 0.5, dense_macs, torch.device("cuda"),
                                           batch_size=64),
                      lambda: calibrate_with_round_up(net, holdout, 2, batch_size=64)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        calibrate()
        assert torch.cuda.max_memory_allocated() - before < held.numel() * held.element_size()
