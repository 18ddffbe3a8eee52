"""torchrun that ends with its ranks' own exit status, without torchrun's traceback.

`python -m torch.distributed.run` turns any failed rank into a ``ChildFailedError`` traceback and exit 1, so a
rank's user error (exit 2, its message already printed) or its preemption exit (75, which slurm/train.sh
requeues on) reach the shell as a generic crash. `bookgen launch` and slurm/train.sh start ranks through this
module instead: same arguments as torchrun, exit status of the first rank that failed (128 + N for signal N).

With ``--max-restarts N`` torchrun restarts every rank when one fails, whatever the reason. A crash or a
killed rank heals that way (the run resumes from its newest complete checkpoint); a user error, a preemption
or a Ctrl-C would only repeat. Ranks that end for such a reason leave their status in a private folder named
by ``BOOKGEN_RESTART_GUARD``, and restarted ranks that find it end at once with the same status
(:mod:`bookgen.restart_guard`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from bookgen.commands.launch import rank_environment
from bookgen.restart_guard import GUARD_VARIABLE


def exit_status(exitcode: int) -> int:
    """A rank's status as a shell reports it: a rank killed by signal N (exitcode -N) is 128 + N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def failure_line(rank: int, status: int) -> str:
    """What the launch prints when ``rank`` failed first with ``status``."""
    return f"bookgen: rank {rank} exited with status {status}" + (" (see its message above)" if status == 2 else "")


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.update(rank_environment())  # the ranks are this process's children
    guard = tempfile.mkdtemp(prefix="bookgen-restart-guard-")
    os.environ[GUARD_VARIABLE] = guard
    try:
        run(parse_args(list(argv) if argv is not None else sys.argv[1:]))
    except ChildFailedError as exc:
        # this node's ranks have ended: a SIGTERM now (srun ends the other nodes' tasks when one fails) must
        # not turn their own status into 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank, failure = exc.get_first_failure()
        status = exit_status(failure.exitcode)
        print(failure_line(rank, status), file=sys.stderr)
        return status
    finally:
        shutil.rmtree(guard, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
