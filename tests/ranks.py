"""Start real ranks: plain python for one, torchrun on loopback for several."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from bookgen.tracking.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "launcher" / "run.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_command(n: int, args: list[str], program: Path = RUN) -> list[str]:
    if n == 1:
        return [sys.executable, str(program), *args]
    return [sys.executable, "-m", "bookgen.commands.torchrun", "--nnodes", "1", "--nproc_per_node", str(n),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(program), *args]


def rank_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.pop("BOOKGEN_FAULT", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env | (extra or {})


def warm() -> bool:
    """Whether tests start bookgen's processes from the warm fork server (``BOOKGEN_TEST_RANKS=fresh``: not)."""
    return os.environ.get("BOOKGEN_TEST_RANKS", "warm") != "fresh"


def launch(n: int, args: list[str], *, timeout: float = 300, env: dict[str, str] | None = None,
           check: bool = True, command: list[str] | None = None, fresh: bool = False, program: Path = RUN
           ) -> subprocess.CompletedProcess[str]:
    """Run ``program`` (``launcher/run.py``, or a test's own rank script) on ``n`` ranks (or ``command``); on
    unexpected failure show the output's tail.

    The ranks are forked from a process that has imported everything already (tests/warm_ranks.py) unless
    ``fresh`` (or ``BOOKGEN_TEST_RANKS=fresh``, or an ``env`` variable read at import) asks for fresh
    interpreters under torchrun, as users start them."""
    from tests import warm_ranks

    if command is None and not fresh and warm() and warm_ranks.can_fork(env):
        proc = warm_ranks.launch(n, args, env=rank_env(env), cwd=REPO, timeout=timeout, program=str(program))
    else:
        proc = subprocess.run(command or rank_command(n, args, program), cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=rank_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def step_losses(run: Path) -> dict[int, float]:
    """Training loss by optimizer step, from a run folder's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
