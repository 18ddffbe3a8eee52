"""Per-rank entry point for every launcher.

    python launcher/run.py --cfg exp.yaml                      # one rank
    torchrun --nproc_per_node 2 launcher/run.py --cfg exp.yaml
    deepspeed --num_gpus 2 launcher/run.py --cfg exp.yaml      # appends --local_rank=N (accepted)
    srun ... launcher/run.py --cfg exp.yaml                    # SLURM_* variables are mapped

`--mode eval --split test` evaluates instead of training; `--set key=value` overrides the experiment.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

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


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
