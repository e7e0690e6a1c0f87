"""The holdout read once for calibration: the dataset's own images and labels, one batch on the device at a time."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from prance.data.held import HeldBatches
from prance.training.round_up import calibrate_with_round_up
from prance.training.selector import calibrate_on
from tests.selector.test_adaptive import _adaptive


def test_batches_are_the_dataset_in_order_and_accuracy_counts_its_labels():
    images = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    held = HeldBatches(TensorDataset(images, labels), "cpu", batch_size=4)
    assert [len(x) for x in held] == [4, 4, 2]  # iterating a Sequence stops at the last batch
    assert torch.equal(torch.cat(list(held)), images) and torch.equal(held.labels, labels)
    assert torch.equal(torch.cat(held[1:]), images[4:])
    guesses = torch.tensor([0, 1, 2, 0, 1, 2, 1, 1, 1, 1])  # 7 of 10 right
    assert held.accuracy(guesses) == pytest.approx(70.0)
    assert held.accuracy(torch.nn.functional.one_hot(guesses, 3).float()) == pytest.approx(70.0)  # logits


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
