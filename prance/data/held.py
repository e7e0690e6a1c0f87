"""A held-out set run many times, one batch on the device at a time.

Calibrating the knob runs the deployed selector over the same holdout images ten to twenty
times (a bisection), and rounding up adds a pass per stage for every knob value tried. Keeping
the images on the *device* would need the whole holdout in device memory (ImageNet at 224 px:
6 GB per 10 000 images). So a holdout that fits in ``max_bytes`` is read and transformed once
and waits in host memory, each batch copied over when it is used; a larger one (the default
10 % holdout of ImageNet is 77 GB as float32) is read again from its data set on every pass:
slower, but memory stays at one batch. ``--holdout-limit`` trades images for time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

#: Holdouts up to this size (as float32 tensors) are kept in host memory between passes.
HOST_CACHE_BYTES = 4 << 30


class HeldBatches(Sequence[torch.Tensor]):
    """``dataset``'s images in batches of ``batch_size`` (in order), each handed out on ``device``;
    ``labels`` holds all the labels, on the host. ``cached`` says whether the images are kept
    in host memory (they fit in ``max_bytes``) or read from ``dataset`` on every pass."""

    def __init__(self, dataset: Dataset, device: torch.device | str, batch_size: int = 256,
                 max_bytes: int = HOST_CACHE_BYTES) -> None:
        self.dataset, self.device, self.batch_size = dataset, torch.device(device), batch_size
        batches: list[torch.Tensor] | None = []
        labels: list[torch.Tensor] = []
        size = 0
        for x, y in self._loader():
            labels.append(y)
            size += x.numel() * x.element_size()
            if batches is not None:
                batches.append(x)
                if size > max_bytes:  # too large to keep: read again on every pass
                    batches = None
        self._batches = batches
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)

    @property
    def cached(self) -> bool:
        return self._batches is not None

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)  # batches: the last may be partial

    def __iter__(self) -> Iterator[torch.Tensor]:
        source = self._batches if self._batches is not None else (x for x, _ in self._loader())
        for x in source:
            yield x.to(self.device)

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        if self._batches is not None:
            return self._batches[index].to(self.device)
        start = index * self.batch_size
        rows = range(start, min(start + self.batch_size, len(self.labels)))
        return default_collate([self.dataset[i] for i in rows])[0].to(self.device)  # as the DataLoader does

    def accuracy(self, predictions: torch.Tensor) -> float:
        """Top-1 (%) of ``predictions`` (class indices or logits, in batch order) against ``labels``."""
        if predictions.dim() > 1:
            predictions = predictions.argmax(-1)
        return 100.0 * float((predictions.cpu() == self.labels).double().mean())


__all__ = ["HOST_CACHE_BYTES", "HeldBatches"]
