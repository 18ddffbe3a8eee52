"""Which rank exits a torchrun restart may heal, and which it would only repeat.

torchrun (``--max-restarts``) restarts every rank of a node when one of them fails, however it failed. A rank
that crashed or was killed resumes from the newest complete checkpoint: the run heals. A rank that stopped
on purpose would do the same thing again: a user error (exit 2) is printed once more per restart, and a
preemption (75) or a Ctrl-C (130) would clear its marker and train on after the user or Slurm asked it to
stop. Such a rank writes its status into the private folder bookgen's torchrun wrapper names in
``BOOKGEN_RESTART_GUARD``; a restarted rank that finds it ends at once, with that status, before it imports
anything heavy. Standard library only: this runs first in every rank.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

GUARD_VARIABLE = "BOOKGEN_RESTART_GUARD"
DELIBERATE = {2: "an error", 75: "a preemption", 130: "a Ctrl-C"}  # exit statuses a restart would repeat
STATUS_FILE = "deliberate-exit"


def restarted(env: Mapping[str, str]) -> bool:
    """Whether torchrun started this rank again after a failure."""
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def repeated_status(env: Mapping[str, str]) -> int | None:
    """On a restart after a deliberate exit: that exit's status (this rank ends with it); else None."""
    guard = env.get(GUARD_VARIABLE)
    if not guard or not restarted(env):
        return None
    try:
        return int((Path(guard) / STATUS_FILE).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def record(status: int, env: Mapping[str, str]) -> None:
    """Leave ``status`` for the restarted ranks when it is one a restart would only repeat."""
    guard = env.get(GUARD_VARIABLE)
    if not guard or status not in DELIBERATE:
        return
    path = Path(guard) / STATUS_FILE
    try:  # the folder is the wrapper's own (mkdtemp, 0700): a fresh name renamed into place
        tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        tmp.write_text(str(status), encoding="ascii")
        os.replace(tmp, path)
    except OSError:
        pass  # no guard: the restart repeats the stop, as plain torchrun would


def exit_if_repeated(env: Mapping[str, str]) -> None:
    status = repeated_status(env)
    if status is None:
        return
    if env.get("LOCAL_RANK", "0") == "0" and env.get("TORCHELASTIC_RESTART_COUNT") == "1":  # said once
        print(f"bookgen: not restarted: the previous attempt stopped on {DELIBERATE.get(status, 'purpose')} "
              f"(status {status}; see above)", file=sys.stderr)
    sys.exit(status)
