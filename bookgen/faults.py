"""Fault injection for the failure tests: BOOKGEN_FAULT=<what>:<step>[:<rank>].

what: ``kill`` (SIGKILL this rank after the step; not again in ranks torchrun restarted: a transient failure),
``kill_in_save`` (SIGKILL during the checkpoint save of that step, after DeepSpeed wrote its files and before
the checkpoint is marked complete), ``sigterm`` / ``sigusr1`` (send the preemption signal to this rank),
``enospc`` (the save fails with "no space left"), ``tracker`` (every tracker's call with that step's metrics
raises, as a tracker whose server or disk is gone would).

The variable is read once, when a run starts (:func:`from_environment`); a run without it holds None and its
loop, saves and trackers pay one ``is None`` test.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from bookgen.restart_guard import restarted


@dataclass(frozen=True, slots=True)
class Fault:
    what: str
    step: int
    rank: int | None  # None: every rank
    first_attempt: bool  # not a rank torchrun restarted

    def inject(self, point: str, step: int, rank: int) -> None:
        """At ``point`` ("step" or "save") of ``step`` on ``rank``: do what the fault says, if it is due."""
        if step != self.step or (self.rank is not None and self.rank != rank):
            return
        if point == "step" and self.what == "kill" and self.first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "step" and self.what in ("sigterm", "sigusr1"):
            os.kill(os.getpid(), signal.SIGTERM if self.what == "sigterm" else signal.SIGUSR1)
        if point == "save" and self.what == "kill_in_save":
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "save" and self.what == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def tracker_fails(self, step: int) -> bool:
        """Whether the trackers' calls for ``step`` are to fail (rank 0 tracks)."""
        return self.what == "tracker" and self.step == step


def from_environment(env: Mapping[str, str]) -> Fault | None:
    spec = env.get("BOOKGEN_FAULT")
    if not spec:
        return None
    parts = spec.split(":")
    return Fault(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None, not restarted(env))
