"""One training run per run folder: rank 0 holds the folder's lock (bookgen.locks) for the whole run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bookgen import distributed
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError
from bookgen.locks import acquire_run_folder


@contextmanager
def hold_run_folder(output_dir: Path, dist: DistEnv) -> Iterator[None]:
    """Every rank: refuse (all ranks together) when another run holds ``output_dir``; else hold it."""
    handle, error = acquire_run_folder(output_dir) if dist.is_main else (None, None)
    errors = distributed.gather_errors(error)
    if errors:
        if handle is not None:
            handle.close()
        raise BookgenError("; ".join(errors))
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays (removing it would race a new holder)
