"""Reproducible 70/20/10 splits: seeded, or the reference notebook's scikit-learn split re-implemented."""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

T = TypeVar("T")

TRAIN_FRACTION, VALID_FRACTION = 0.7, 0.2


Parts = tuple[np.ndarray, np.ndarray, np.ndarray]


def seeded_split_indices(n: int, seed: int) -> Parts:
    """Row indices of train, valid and test: shuffle ``range(n)`` with ``seed`` and cut 70/20/10. Computed from
    the row count alone, so a corpus never has to be held to be split."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = round(TRAIN_FRACTION * n)
    n_valid = round(VALID_FRACTION * n)
    return order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid :]


def reference_split_indices(n: int) -> Parts:
    """Row indices of the reference notebook's split: 90/10 then 7/9 of the rest, both with
    ``random_state=1``, keeping scikit-learn's order."""
    rest_idx, test_idx = shuffle_split_indices(n, 0.9, 1)
    train_idx, valid_idx = shuffle_split_indices(len(rest_idx), 7 / 9, 1)
    return rest_idx[train_idx], rest_idx[valid_idx], test_idx


def _pick(items: list[T], parts: Parts) -> tuple[list[T], list[T], list[T]]:
    train, valid, test = ([items[i] for i in part] for part in parts)
    return train, valid, test


def seeded_split(items: list[T], seed: int) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed`` and cut 70/20/10 (train, valid, test)."""
    return _pick(items, seeded_split_indices(len(items), seed))


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
    """The reference notebook: 90/10 then 7/9 of the rest, both with ``random_state=1``."""
    return _pick(items, reference_split_indices(len(items)))
