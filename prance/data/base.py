"""What every dataset here shares: a description of its samples and cheap sub-views."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch
from torch.utils.data import Dataset

Sample = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a model needs to know about a dataset's samples, in one place."""

    name: str
    split: str
    class_names: tuple[str, ...]
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class IndexedDataset(Dataset[Sample]):
    """A split stored once (labels for every sample) and seen through an index.

    ``select`` returns a view sharing the storage, so ``--limit``, test slices and
    held-out splits cost no copies and keep ``info`` and the batched loading path.
    Subclasses set ``info``, ``_labels`` (all samples) and ``_index`` (this view).
    """

    info: DatasetInfo
    _labels: torch.Tensor
    _index: torch.Tensor

    def select(self, indices: Sequence[int] | slice | torch.Tensor) -> Self:
        """A view on some samples of this one (positions relative to this view)."""
        view = copy.copy(self)
        view._index = self._index[as_index(indices)]
        return view

    @property
    def indices(self) -> torch.Tensor:
        """Where this view's samples sit in the whole split, int64 [len(self)] (to say which images were used)."""
        return self._index

    @property
    def targets(self) -> torch.Tensor:
        """Labels of the samples in this view, int64 [len(self)]."""
        return self._labels[self._index]

    def __len__(self) -> int:
        return len(self._index)


def as_index(indices: Sequence[int] | slice | torch.Tensor) -> slice | torch.Tensor:
    """Indices usable on a 1-D tensor: slices stay slices, sequences become int64."""
    return indices if isinstance(indices, slice) else torch.as_tensor(indices, dtype=torch.long)
