"""A held-out set read once and run many times, one batch on the device at a time.

Calibrating the knob runs the deployed selector over the same holdout images ten to twenty
times (a bisection), and rounding up adds a pass per stage for every knob value tried. Reading
and transforming the images once saves all but the first pass; keeping them on the *device*
would need the whole holdout in device memory (ImageNet at 224 px: 6 GB per 10 000 images), so
they wait in host memory and each batch is copied over when it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch.utils.data import DataLoader, Dataset


class HeldBatches(Sequence[torch.Tensor]):
    """``dataset``'s images in batches of ``batch_size`` (in order), each handed out on ``device``;
    ``labels`` holds all the labels, on the host."""

    def __init__(self, dataset: Dataset, device: torch.device | str, batch_size: int = 256) -> None:
        self.device = torch.device(device)
        self._batches: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            self._batches.append(x)
            labels.append(y)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self._batches)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [x.to(self.device) for x in self._batches[index]]
        return self._batches[index].to(self.device)

    def accuracy(self, predictions: torch.Tensor) -> float:
        """Top-1 (%) of ``predictions`` (class indices or logits, in batch order) against ``labels``."""
        if predictions.dim() > 1:
            predictions = predictions.argmax(-1)
        return 100.0 * float((predictions.cpu() == self.labels).double().mean())


__all__ = ["HeldBatches"]
