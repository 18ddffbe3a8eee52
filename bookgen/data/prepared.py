"""Training's data gate: rank 0 prepares (a no-op when up to date) while the others wait, then every rank
opens the prepared splits as examples. Nobody tokenizes on their own."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from rich.console import Console

from bookgen import distributed
from bookgen.data.batches import Examples
from bookgen.data.prepare import PrepareSpec, open_store, prepare_spec
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError
from bookgen.fileio import write_text_atomic


def ensure_prepared(spec: PrepareSpec, dist: DistEnv, console: Console, *, run_dir: Path) -> None:
    """Rank 0 prepares (a no-op when up to date) while the others wait; nobody tokenizes on their own.

    The others do not wait in a collective: a first prepare of a multi-GB corpus takes longer than the process
    group's timeout (deepspeed.comm_timeout_s), and gloo or NCCL would end the job. Rank 0 writes the outcome
    to a file in the run folder named for this attempt, and the others poll for it as long as preparing takes;
    a failure on rank 0 is in that file too, so every rank stops at once with its message. ``run_dir``: the run
    folder, where that file goes."""
    if dist.world_size == 1:
        failure = _prepare(spec, console)
    else:
        attempt = distributed.broadcast_object(secrets.token_hex(8) if dist.is_main else None)
        outcome = run_dir / f".prepared-{attempt}"
        if dist.is_main:
            failure = _prepare(spec, console)
            write_text_atomic(outcome, failure or "ok")
        else:
            text = _wait_for(outcome)
            failure = None if text == "ok" else text
        distributed.barrier()  # every rank has read it
        if dist.is_main:
            outcome.unlink(missing_ok=True)
    if failure:
        raise BookgenError(f"preparing the data failed on rank 0: {failure}")


def _prepare(spec: PrepareSpec, console: Console) -> str | None:
    """Rank 0's prepare; what went wrong, as text, or None."""
    try:
        prepare_spec(spec, quiet=not console.is_terminal)
    except Exception as exc:  # every rank must hear about it, or the others wait forever
        return f"{type(exc).__name__}: {exc}"
    return None


def _wait_for(path: Path, poll_s: float = 0.2) -> str:
    """The text rank 0 writes to ``path`` when its prepare ends, however long that takes (if rank 0 dies, the
    launcher ends this rank)."""
    while True:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            time.sleep(poll_s)


def prepared_examples(spec: PrepareSpec, split: str, *, compiled: bool = False) -> Examples:
    """A split's examples, after :func:`ensure_prepared`: rank 0 has just checked every shard there (hashed,
    or matched to the digest remembered for the unchanged file), so the ranks do not hash the shards again.
    Training uses ``data.packing``; evaluation always scores each summary on its own, packed with document
    boundaries (equal to one at a time, faster), so its perplexity is comparable whatever the training
    layout. ``compiled``: they feed a compiled model (one shape, :class:`Examples`)."""
    packing = spec.data.packing if split == "train" else "documents"
    return Examples.build(open_store(spec.prepared_dir, split, verify=False), spec.data.block_size, packing,
                          compiled=compiled)
