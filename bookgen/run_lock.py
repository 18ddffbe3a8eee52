"""One training run per run folder at a time.

The same command started twice (two terminals, `sbatch` twice, a relaunch while the old job still runs)
would have both runs resume from the same checkpoint, save the same steps into the same folders and
interleave one metrics log: each could remove the other's half-written checkpoint or keep the other's
weights under its own step. Rank 0 holds an exclusive `flock` on a file in the run folder for the whole
run; the kernel releases it when the process ends however it ends, so a killed run leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from bookgen import distributed
from bookgen.distributed import DistEnv
from bookgen.errors import BookgenError

LOCK_NAME = ".bookgen-run.lock"


@contextmanager
def hold_run_folder(output_dir: Path, dist: DistEnv) -> Iterator[None]:
    """Every rank: refuse (all ranks together) when another run holds ``output_dir``; else hold it."""
    handle, error = _acquire(output_dir) if dist.is_main else (None, None)
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


def _acquire(output_dir: Path) -> tuple[IO[str] | None, str | None]:
    path = output_dir / LOCK_NAME
    try:
        handle = open(path, "a+", encoding="utf-8")  # held open: the lock lasts as long as the run
    except OSError as exc:
        return None, f"run.output_dir: cannot open {path} ({exc.strerror or exc})"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        return None, (f"{output_dir}: another bookgen run is training into this folder ({holder}); wait for it "
                      "to end or stop it, or give this run another run.output_dir")
    except OSError:  # a file system without locks (some network mounts): run unguarded rather than not at all
        return handle, None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None
