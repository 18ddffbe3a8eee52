"""Reproducible 70/20/10 splits: seeded, or the reference notebook's scikit-learn split re-implemented."""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

T = TypeVar("T")

TRAIN_FRACTION, VALID_FRACTION = 0.7, 0.2


def seeded_split(items: list[T], seed: int) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed`` and cut 70/20/10 (train, valid, test)."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_train = round(TRAIN_FRACTION * len(items))
    n_valid = round(VALID_FRACTION * len(items))
    pick = [items[i] for i in order]
    return pick[:n_train], pick[n_train : n_train + n_valid], pick[n_train + n_valid :]


def shuffle_split_indices(n: int, train_size: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of scikit-learn's ``train_test_split(range(n), train_size=..., random_state=...)``.

    scikit-learn floors the train count, gives the rest to test, draws one
    ``RandomState(random_state).permutation(n)`` and takes test first, then train.
    """
    n_train = math.floor(train_size * n)
    n_test = n - n_train
    permutation = np.random.RandomState(random_state).permutation(n)
    return permutation[n_test : n_test + n_train], permutation[:n_test]


def reference_split(items: list[T]) -> tuple[list[T], list[T], list[T]]:
    """The reference notebook: 90/10 then 7/9 of the rest, both with ``random_state=1``, keeping row order."""
    rest_idx, test_idx = shuffle_split_indices(len(items), 0.9, 1)
    rest = [items[i] for i in rest_idx]
    train_idx, valid_idx = shuffle_split_indices(len(rest), 7 / 9, 1)
    return [rest[i] for i in train_idx], [rest[i] for i in valid_idx], [items[i] for i in test_idx]
