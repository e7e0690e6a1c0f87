"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from prance.data.fashion_mnist import FashionMNIST


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, set[int]]]:
    """Every Fashion-MNIST read: (split file, whether the view augments, storage rows).

    A spy on the one place the images are read (``FashionMNIST._batch``): training steps read
    augmented views, validation and selection plain ones.
    """
    seen: list[tuple[str, bool, set[int]]] = []
    real = FashionMNIST._batch

    def spy(self, positions):
        seen.append((self.info.split, self.transform.train_augment, set(self._index[positions].tolist())))
        return real(self, positions)

    monkeypatch.setattr(FashionMNIST, "_batch", spy)
    return seen
