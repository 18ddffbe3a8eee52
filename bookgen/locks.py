"""One training run per run folder, and one prepare per prepared folder, at a time.

The same command started twice (two terminals, `sbatch` twice, a relaunch while the old job still runs)
would have both runs resume from the same checkpoint, save the same steps into the same folders and
interleave one metrics log: each could remove the other's half-written checkpoint or keep the other's
weights under its own step. Rank 0 holds an exclusive `flock` on a file in the run folder for the whole
run (train/run_lock.hold_run_folder); the kernel releases it when the process ends however it ends, so a
killed run leaves no stale lock.

Two prepares into one prepared folder (two runs sharing a dataset, started together) would each rebuild stages
the other is writing and report the other's numbers; the second waits for the first instead, then finds the
folder up to date or rebuilds it for its own settings. A folder this user cannot write (a shared, read-only
dataset on a cluster) takes no lock: nobody here can change it, and it is used as it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from bookgen.errors import BookgenError
from bookgen.fileio import open_regular

LOCK_NAME = ".bookgen-run.lock"
PREPARE_LOCK_NAME = ".prepare.lock"  # no dash: scratch folders are the dot-names with one


@contextmanager
def hold_prepared_folder(folder: Path, notify: Callable[[str], None]) -> Iterator[None]:
    """Hold ``folder``'s prepare lock, waiting (and saying so through ``notify``) while another holds it."""
    try:
        handle = open_regular(folder / PREPARE_LOCK_NAME, "a+")
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # read-only: used as it is, or refused
            yield                                                 # by the first stage that must write
            return
        raise BookgenError(f"data.prepared_dir: cannot open {folder / PREPARE_LOCK_NAME} "
                           f"({exc.strerror or exc})") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            notify(f"waiting for another bookgen prepare of {folder} ({handle.read().strip() or 'holder unknown'})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: prepare unguarded rather than not at all
            pass
        _write_holder(handle)
        yield


def _write_holder(handle: IO[str]) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()


def acquire_run_folder(output_dir: Path) -> tuple[IO[str] | None, str | None]:
    """The run folder's lock held (its open file), or why not."""
    path = output_dir / LOCK_NAME
    try:
        handle = open_regular(path, "a+")  # held open: the lock lasts as long as the run
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
    _write_holder(handle)
    return handle, None
