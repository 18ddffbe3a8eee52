"""Per-rank entry point for every launcher.

    python launcher/run.py --cfg exp.yaml                      # one rank
    torchrun --nproc_per_node 2 launcher/run.py --cfg exp.yaml
    deepspeed --num_gpus 2 launcher/run.py --cfg exp.yaml      # appends --local_rank=N (accepted)
    srun ... launcher/run.py --cfg exp.yaml                    # SLURM_* variables are mapped

`--mode eval --split test` evaluates instead of training; `--set key=value` overrides the experiment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bookgen import restart_guard  # noqa: E402

restart_guard.exit_if_repeated(os.environ)  # before the heavy imports: a restart that would only repeat a stop

from bookgen.cli import main  # noqa: E402

MODES = ("train", "eval", "generate", "export", "prepare")  # bookgen subcommands a launcher may start


def run(argv: list[str]) -> int:
    mode = "train"
    for i, arg in enumerate(argv):
        if arg == "--mode" or arg.startswith("--mode="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in MODES:
                print(f"launcher/run.py: --mode needs one of {', '.join(MODES)}, got {value or 'nothing'!r}",
                      file=sys.stderr)
                return 2
            mode = value
            argv = argv[:i] + argv[i + (1 if "=" in arg else 2) :]
            break
    return main([mode, *argv])


def run_recorded(argv: list[str]) -> int:
    """:func:`run`, leaving a deliberate exit's status for torchrun's restarts (see bookgen.restart_guard)."""
    try:
        status = run(argv)
    except SystemExit as exc:
        status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    restart_guard.record(status, os.environ)
    return status


if __name__ == "__main__":
    sys.exit(run_recorded(sys.argv[1:]))
