"""Fault injection for the failure tests: BOOKGEN_FAULT=<what>:<step>[:<rank>].

what: ``kill`` (SIGKILL this rank after the step; not again in ranks torchrun restarted: a transient failure),
``kill_in_save`` (SIGKILL during the checkpoint save
of that step, after DeepSpeed wrote its files and before the checkpoint is marked complete),
``sigterm`` / ``sigusr1`` (send the preemption signal to this rank), ``enospc`` (the save fails with
"no space left"), ``tracker`` (every tracker's call with that step's metrics raises, as a tracker whose
server or disk is gone would). Without the variable nothing happens; the cost is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

from bookgen.restart_guard import restarted


def _parse() -> tuple[str, int, int | None] | None:
    spec = os.environ.get("BOOKGEN_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None


def inject(point: str, step: int, rank: int) -> None:
    fault = _parse()
    if fault is None:
        return
    what, at_step, only_rank = fault
    if step != at_step or (only_rank is not None and only_rank != rank):
        return
    if point == "step" and what == "kill" and not restarted(os.environ):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "step" and what in ("sigterm", "sigusr1"):
        os.kill(os.getpid(), signal.SIGTERM if what == "sigterm" else signal.SIGUSR1)
    if point == "save" and what == "kill_in_save":
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "save" and what == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def tracker_fails(step: int) -> bool:
    """Whether the trackers' calls for ``step`` are to fail (``BOOKGEN_FAULT=tracker:<step>``; rank 0 tracks)."""
    fault = _parse()
    return fault is not None and fault[0] == "tracker" and fault[1] == step
