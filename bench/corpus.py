"""Synthetic benchmark text whose document lengths look like the CMU summaries."""

from __future__ import annotations

import numpy as np

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "we", "zu")
         for b in ("rat", "mel", "dos", "fin", "gar", "hul", "jin", "pok", "sem", "tov", "ux", "y")]


def cmu_like_documents(docs: int, seed: int = 0) -> list[str]:
    """Median about 500 tokens, a quarter longer than 1024 (each word here is about one token)."""
    rng = np.random.default_rng(seed)
    words = np.clip(rng.lognormal(mean=np.log(500), sigma=1.06, size=docs), 20, 4000).astype(int)
    return [" ".join(rng.choice(VOCAB, size=n)) + "." for n in words]
