"""Training's data gate: rank 0 prepares (a no-op when up to date) while the others wait, then every rank
opens the prepared splits as examples. Nobody tokenizes on their own."""

from __future__ import annotations

from rich.console import Console

from bookgen import distributed
from bookgen.config import ExperimentConfig
from bookgen.data.batches import Examples
from bookgen.data.prepare import open_store, prepare
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError


def ensure_prepared(cfg: ExperimentConfig, dist: DistEnv, console: Console) -> None:
    """Rank 0 prepares (a no-op when up to date) while the others wait; nobody tokenizes on their own."""
    failure: str | None = None
    if dist.is_main:
        try:
            prepare(cfg, quiet=not console.is_terminal)
        except Exception as exc:  # every rank must hear about it, or the others wait forever
            failure = f"{type(exc).__name__}: {exc}"
    failure = distributed.broadcast_object(failure)  # type: ignore[assignment]
    if failure:
        raise BookgenError(f"preparing the data failed on rank 0: {failure}")


def prepared_examples(cfg: ExperimentConfig, split: str) -> Examples:
    """A split's examples, after :func:`ensure_prepared`: rank 0 has just checked every shard there (hashed,
    or matched to the digest remembered for the unchanged file), so the ranks do not hash the shards again.
    Training uses ``data.packing``; evaluation always scores each summary on its own, packed with document
    boundaries (equal to one at a time, faster), so its perplexity is comparable whatever the training
    layout."""
    packing = cfg.data.packing if split == "train" else "documents"
    return Examples.build(open_store(cfg, split, verify=False), cfg.data.block_size, packing)
