"""Ranks forked from a process that has already imported torch, DeepSpeed, transformers and bookgen.

A rank started as a fresh interpreter spends about 5 of its 6 seconds importing (torch, transformers' model
code, DeepSpeed, and mlflow, which DeepSpeed's autotuner imports whenever it is installed); the suite starts
some two hundred of them. Here a multiprocessing fork server imports all that once per test process, and
each rank is a fork of it that runs ``launcher/run.py``'s code with the environment torchrun would give it.
The rank code, DeepSpeed, gloo and the separate rank processes are all real; what is not exercised here
is torchrun and a fresh interpreter, which tests/commands/test_launch.py, test_slurm.py and the tests that
pass ``fresh=True`` to :func:`tests.ranks.launch` cover. A test that sets a variable read at import (anything
outside :data:`READ_AT_RUN_TIME`) gets fresh ranks too. ``BOOKGEN_TEST_RANKS=fresh`` starts every rank the
slow way.

Like bookgen's torchrun wrapper (bookgen/commands/torchrun.py), the launch ends with the status of the
first rank that failed, and the other ranks get SIGTERM, then SIGKILL after torchrun's 30 seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bookgen.deepspeed_import import load_deepspeed

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "launcher" / "run.py"
CLI = "bookgen.cli"

# DeepSpeed is imported by tests.warm_ranks itself, as bookgen imports it (bookgen/deepspeed_import.py: without
# MLflow, which a rank imports only when it tracks with it)
PRELOAD = [
    "torch", "transformers", "transformers.modeling_utils",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2", "bookgen.cli", "bookgen.train.loop",
    "bookgen.commands.eval", "bookgen.commands.generate", "bookgen.checkpoint.export", "tests.warm_ranks",
]
# variables a test may set for a warm rank: read while the rank runs, not when it imports (the fork server
# imported torch with its own environment: TORCHINDUCTOR_CACHE_DIR, for one, would be ignored)
READ_AT_RUN_TIME = {"BOOKGEN_FAULT", "WANDB_MODE", "WANDB_SILENT"}
TERMINATE_GRACE_S = 30.0  # torchrun's wait between SIGTERM and SIGKILL

_context: multiprocessing.context.ForkServerContext | None = None

load_deepspeed()  # in the fork server (this module is preloaded) and in the test process


def _server() -> multiprocessing.context.ForkServerContext:
    """The fork server, started once per test process with the environment ranks start from."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        from bookgen.commands.launch import rank_environment
        from tests.ranks import rank_env

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(rank_environment(rank_env()))  # what glibc and the imports read at start
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _child(program: str, argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """One process: this test's environment, folder and output files, then ``program`` as ``python PROGRAM``
    (launcher/run.py) or ``python -m bookgen.cli`` would run it."""
    import atexit
    import io

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # ranks share it as they would a pipe
        os.dup2(out, fd)
        os.close(out)
    # unbuffered, as PYTHONUNBUFFERED makes a fresh rank: a rank that is killed loses nothing it printed
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the fork server ignores it
    sys.argv = [program, *argv]
    try:
        if program == CLI:
            from bookgen.cli import main  # already imported: runpy would warn about running it again

            sys.exit(main(argv))
        runpy.run_path(program, run_name="__main__")  # ends in sys.exit(status)
    finally:
        atexit._run_exitfuncs()  # a fresh interpreter runs them at exit; a forked child would not


def can_fork(extra_env: dict[str, str] | None) -> bool:
    """Whether a warm process sees ``extra_env`` as a fresh one would (else the test starts a fresh one)."""
    return set(extra_env or {}) <= READ_AT_RUN_TIME


def cli(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bookgen.cli ARGV`` in a warm process; the result as ``subprocess.run`` would give it."""
    return launch(1, argv, env=env, cwd=cwd, timeout=timeout, program=CLI)


def launch(n: int, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float, program: str = str(RUN)
           ) -> subprocess.CompletedProcess[str]:
    """``launcher/run.py ARGV`` on ``n`` warm ranks; the result as ``subprocess.run`` would give it."""
    from bookgen.commands.torchrun import exit_status, failure_line
    from tests.ranks import free_port

    context = _server()
    with tempfile.TemporaryDirectory(prefix="bookgen-ranks-") as folder:
        stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
        port = str(free_port())
        ranks = []
        for rank in range(n):
            rank_env = dict(env)
            if n > 1:  # what torchrun sets; one rank runs as plain `python launcher/run.py`
                rank_env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                             "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": port, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
            proc = context.Process(target=_child, args=(program, argv, rank_env, str(cwd), str(stdout), str(stderr)))
            proc.start()
            ranks.append(proc)
        status = _wait(ranks, timeout)
        if status is None:
            raise subprocess.TimeoutExpired(argv, timeout, stdout.read_text(), stderr.read_text())
        failed = next(((rank, exit_status(code)) for rank, code in status if code != 0), None)
        if failed is not None and n > 1:
            with stderr.open("a") as err:
                err.write(failure_line(*failed) + "\n")
        return subprocess.CompletedProcess(argv, failed[1] if failed else 0, stdout.read_text(errors="replace"),
                                           stderr.read_text(errors="replace"))


def _wait(ranks: list, timeout: float) -> list[tuple[int, int]] | None:
    """(rank, exit code) in the order the ranks ended; after the first failure the others get SIGTERM, then
    SIGKILL after torchrun's grace. None on timeout, every rank killed."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    terminated_at = None
    while len(codes) < len(ranks):
        for rank, proc in enumerate(ranks):
            if rank not in codes and proc.exitcode is not None:
                codes[rank] = proc.exitcode
        running = [proc.pid for rank, proc in enumerate(ranks) if rank not in codes]
        now = time.monotonic()
        if terminated_at is None and any(codes.values()):
            terminated_at = now
            _signal(running, signal.SIGTERM)
        if (terminated_at is not None and now - terminated_at > TERMINATE_GRACE_S) or now > deadline:
            _signal(running, signal.SIGKILL)
            if now > deadline:
                for proc in ranks:
                    proc.join()
                return None
        time.sleep(0.02)
    return list(codes.items())


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
