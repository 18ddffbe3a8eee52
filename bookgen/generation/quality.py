"""Measures of generated summaries that perplexity cannot show: do they end, are they the right length, do they
loop, are they copied from the training set. Pure functions over token ids; used by the samples written at
each evaluation, by `bookgen generate` and by `bookgen samples`.

- stop rate: the share of samples that ended at ``<EOS>`` before ``max_new_tokens``;
- length: median and quartiles of sample lengths (tokens, ``<EOS>`` excluded), beside the validation split's;
- repetition: distinct-1 / distinct-2 (unique n-grams over all n-grams, pooled over the samples) and the
  share of a sample's 4-grams that already occurred earlier in it (degeneration: loops repeat 4-grams);
- novelty: the share of a sample's 8-grams that occur in the training split, and the longest run of tokens
  whose every 8-gram occurs there (a verbatim copy of at least that many tokens, up to hash collisions and
  runs that join two training summaries).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from bookgen.data.store import TokenStore

NOVELTY_N = 8
REPEAT_N = 4
_PRIME = np.uint64(1_000_003)


def ngram_hashes(tokens: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-gram of ``tokens`` (empty when it is shorter than n)."""
    ids = np.asarray(tokens, dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, np.uint64)
    hashes = np.zeros(len(ids) - n + 1, np.uint64)
    with np.errstate(over="ignore"):  # wraps modulo 2**64, as intended
        for k in range(n):  # n passes over the whole array, none per n-gram
            hashes = hashes * _PRIME + ids[k : len(ids) - n + 1 + k]
    return hashes


class NgramIndex:
    """The sorted hashes of a corpus' n-grams (each document's own: none spans two documents)."""

    def __init__(self, hashes: np.ndarray, n: int = NOVELTY_N) -> None:
        self.n = n
        self._hashes = np.sort(hashes)

    @classmethod
    def of_documents(cls, documents: Iterable[np.ndarray], n: int = NOVELTY_N) -> NgramIndex:
        docs = [np.asarray(d) for d in documents]
        if not docs:
            return cls(np.zeros(0, np.uint64), n)
        return cls.of_concatenated(np.concatenate(docs), np.cumsum([0, *map(len, docs)]), n)

    @classmethod
    def of_concatenated(cls, tokens: np.ndarray, offsets: np.ndarray, n: int = NOVELTY_N) -> NgramIndex:
        """From all documents back to back (``offsets``: where each starts, and the end): one vectorised
        pass, then the n-grams that would cross a document boundary are dropped."""
        hashes = ngram_hashes(tokens, n)
        inside = np.ones(len(hashes), dtype=bool)
        ends = np.asarray(offsets[1:], dtype=np.int64)
        for k in range(1, n):  # an n-gram starting k < n tokens before a document's end crosses it
            starts = ends - k
            inside[starts[(starts >= 0) & (starts < len(hashes))]] = False
        return cls(hashes[inside], n)

    @classmethod
    def of_store(cls, store: TokenStore, n: int = NOVELTY_N) -> NgramIndex:
        """A prepared split's n-grams, read shard by shard from the memory-mapped token store."""
        parts = [cls.of_concatenated(np.asarray(tokens), offsets, n)._hashes
                 for tokens, offsets in store.shards()]
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.uint64), n)

    def __len__(self) -> int:
        return len(self._hashes)

    def contains(self, tokens: Sequence[int]) -> np.ndarray:
        """For each n-gram of ``tokens`` (in order): whether the corpus has it."""
        hashes = ngram_hashes(tokens, self.n)
        at = np.searchsorted(self._hashes, hashes)
        found = at < len(self._hashes)
        found[found] = self._hashes[at[found]] == hashes[found]
        return found


def repeated_share(tokens: Sequence[int], n: int = REPEAT_N) -> float:
    """The share of the n-grams of one sample that already occurred earlier in it (0 for no n-gram)."""
    hashes = ngram_hashes(tokens, n)
    if len(hashes) == 0:
        return 0.0
    _, first = np.unique(hashes, return_index=True)
    return 1.0 - len(first) / len(hashes)


def distinct(samples: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over the samples (1.0: nothing repeats; 0 when none)."""
    grams = [ngram_hashes(s, n) for s in samples]
    total = sum(len(g) for g in grams)
    return len(np.unique(np.concatenate(grams))) / total if total else 0.0


def longest_copied_run(found: np.ndarray, n: int) -> int:
    """The longest run of tokens whose every n-gram is in the corpus (0 when no n-gram is)."""
    best = run = 0
    for hit in found:
        run = run + 1 if hit else 0
        best = max(best, run)
    return best + n - 1 if best else 0


@dataclass(frozen=True, slots=True)
class Quality:
    samples: int
    stop_rate: float
    length_median: float
    length_q1: float
    length_q3: float
    distinct_1: float
    distinct_2: float
    repeated_4gram_share: float  # mean over samples
    copied_8gram_share: float  # mean over samples with at least one 8-gram
    longest_copied_span: int  # over all samples, tokens
    reference_length_median: float | None = None  # the validation summaries', when given

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def measure(samples: Sequence[Sequence[int]], stopped: Sequence[bool], index: NgramIndex | None,
            reference_lengths: np.ndarray | None = None) -> Quality:
    """The measures of a batch of samples (``samples``: new token ids, ``<EOS>`` excluded)."""
    lengths = np.array([len(s) for s in samples], dtype=np.float64)
    q1, median, q3 = np.percentile(lengths, [25, 50, 75]) if len(lengths) else (0.0, 0.0, 0.0)
    copied, longest = [], 0
    if index is not None:
        for s in samples:
            found = index.contains(s)
            if len(found):
                copied.append(float(found.mean()))
                longest = max(longest, longest_copied_run(found, index.n))
    return Quality(
        samples=len(samples), stop_rate=float(np.mean(stopped)) if len(stopped) else 0.0,
        length_median=float(median), length_q1=float(q1), length_q3=float(q3),
        distinct_1=distinct(samples, 1), distinct_2=distinct(samples, 2),
        repeated_4gram_share=float(np.mean([repeated_share(s) for s in samples])) if samples else 0.0,
        copied_8gram_share=float(np.mean(copied)) if copied else 0.0, longest_copied_span=longest,
        reference_length_median=None if reference_lengths is None else float(np.median(reference_lengths)),
    )
