"""The `bookgen` command: prepare, train, eval, export, generate, samples, plan, launch, show, runs, config-help.

`train` and `eval` run in this process as one rank, or as one of many when started by torchrun,
the deepspeed launcher or srun (see launcher/run.py, which calls :func:`main` too).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bookgen.commands.launch import launch_command, launch_warnings, plan_check_command, rank_environment
from bookgen.commands.runs import runs_command
from bookgen.config import LaunchConfig
from bookgen.config_io import config_to_dict, describe_fields, load_config
from bookgen.errors import BookgenError, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bookgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_cfg(p: argparse.ArgumentParser, required: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--cfg", required=required, help="experiment YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.max_steps=10 (repeatable)")
        # the deepspeed launcher appends --local_rank=N; rank discovery reads the environment instead
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        return p

    prep = with_cfg(sub.add_parser("prepare", help="split, tokenize and store the corpus"))
    prep.add_argument("--download", action="store_true", help="fetch the corpus archive from data.download_url")
    prep.add_argument("--verify", action="store_true",
                      help="hash every input and output again instead of trusting digests of unchanged files")
    with_cfg(sub.add_parser("train", help="train (prepares the data first when needed)"))
    which = {"default": None, "metavar": "latest|best|DIR",
             "help": "checkpoint: the newest complete one (default), the best by validation loss, or a folder"}
    ev = with_cfg(sub.add_parser("eval", help="perplexity of a checkpoint (or the fresh model) on a split"))
    ev.add_argument("--split", choices=["train", "valid", "test"], default="test")
    ev.add_argument("--checkpoint", **which)
    ex = with_cfg(sub.add_parser("export", help="write a Hugging Face folder from a checkpoint"))
    ex.add_argument("--checkpoint", **which)
    ex.add_argument("--out", type=Path, required=True, help="folder to write: a new one or a previous export")
    ex.add_argument("--force", action="store_true",
                    help="write into a non-empty folder that is not a previous export (adds files, deletes none)")
    ex.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                    help="largest safetensors file (e.g. 5GB, 500MB); a larger model is written in shards with an "
                         "index, as save_pretrained writes them (default 5GB, the hub's usual)")
    ex.add_argument("--adapter-only", action="store_true",
                    help="a LoRA run: write the adapter folder peft loads (adapter_config.json and its weights) "
                         "instead of the merged model")
    la = with_cfg(sub.add_parser("launch", help="start the ranks as the launch section says"))
    la.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    sh = with_cfg(sub.add_parser("show", help="print one resolved config value (for scripts)"))
    sh.add_argument("--key", required=True, help="dotted key, e.g. run.output_dir")
    gen = with_cfg(sub.add_parser("generate", help="sample summaries from an exported model or a run's checkpoint"),
                   required=False)
    gen.add_argument("--model", type=Path, default=None, help="exported Hugging Face folder")
    gen.add_argument("--checkpoint", **which)
    gen.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable); default the begin token")
    gen.add_argument("--prompts", type=Path, default=None,
                     help="prompt file: text (one per line) or .jsonl (rows with the template's fields, or prompts)")
    gen.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                     help="render .jsonl rows with this template (default: the run's data.prompt)")
    gen.add_argument("--out", type=Path, default=None,
                     help="JSONL output (a .txt and a .quality.json are written beside it)")
    gen.add_argument("--force", action="store_true",
                     help="replace output files of those names that bookgen generate did not write")
    for flag, kind in (("top-k", int), ("top-p", float), ("temperature", float), ("repetition-penalty", float),
                       ("max-new-tokens", int), ("num-return-sequences", int), ("seed", int), ("batch-size", int)):
        gen.add_argument(f"--{flag}", type=kind, default=None)
    with_cfg(sub.add_parser("samples", help="generation quality of every checkpoint the run keeps"))
    pl = with_cfg(sub.add_parser("plan", help="will the experiment fit these GPUs, and how long will it take"))
    pl.add_argument("--gpus", type=int, default=None, help="GPUs a node (default: this machine's, else the launch "
                                                          "section's gpus_per_node; none: a CPU plan)")
    pl.add_argument("--gpu-memory", default=None, metavar="SIZE",
                    help="memory of one GPU, e.g. 80GB or 24GiB (default: this machine's GPU, else 80GB)")
    pl.add_argument("--nodes", type=int, default=None, help="nodes (default: launch.nodes)")
    pl.add_argument("--json", action="store_true", help="the plan as JSON (bytes and seconds)")
    pl.add_argument("--check", action="store_true",
                    help="exit 2 when it will not fit (slurm/train.sh runs this before anything starts)")
    runs = sub.add_parser("runs", help="run folders side by side: status, speed, perplexity, samples")
    runs.add_argument("folders", nargs="*", type=Path, metavar="FOLDER",
                      help="run folders, or folders of run folders (default: ./runs)")
    runs.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                      help="also draw the runs' validation losses on one chart")
    sub.add_parser("config-help", help="list every config key with its default and meaning")
    return parser


# Each heavy command's runner, imported when that command runs: `bookgen show` (which slurm/train.sh calls),
# `bookgen runs` and `bookgen launch` answer without importing torch, DeepSpeed and transformers (3 s).
RUNNERS = {
    "prepare": "bookgen.commands.prepare:prepare_command",
    "train": "bookgen.commands.train:train_command",
    "eval": "bookgen.commands.eval:eval_command",
    "export": "bookgen.commands.export:export_command",
    "generate": "bookgen.commands.generate:generate_command",
    "samples": "bookgen.commands.samples:samples_command",
    "plan": "bookgen.commands.plan:plan_command",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        return _dispatch(args, console)
    except BookgenError as exc:
        return _report(console, str(exc))
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop (which handles its own): no traceback
        console.print("interrupted", highlight=False)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # a disk that filled up (or was remounted read-only) while running: say where, not a traceback
        return _report(console, f"{exc.filename or 'a file'}: {exc.strerror}; what was complete before is "
                                "untouched: free space and rerun the same command")


def _report(console: Console, message: str) -> int:
    from bookgen.distributed import discover  # the error path alone pays for torch here

    dist = discover(os.environ)
    who = f" (rank {dist.rank} of {dist.world_size})" if dist.world_size > 1 else ""
    # escaped: a message may hold brackets (pip install 'bookgen[mlflow]', a list of keys) that are not markup
    console.print(f"[bold red]error{who}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 2


def _dispatch(args: argparse.Namespace, console: Console) -> int:
    if args.command == "config-help":
        for key, default, text in describe_fields():
            print(f"{key:32s} {default:24s} {text}")
        return 0
    if args.command == "runs":
        return runs_command(args.folders, args.plot, console)
    if args.command in RUNNERS:
        module, name = RUNNERS[args.command].split(":")
        runner: Callable[[argparse.Namespace, Console], int] = getattr(importlib.import_module(module), name)
        return runner(args, console)
    cfg = load_config(args.cfg, args.overrides)
    if args.command == "launch":
        return _launch(cfg.launch, args, console)
    if args.command == "show":
        return _show(config_to_dict(cfg), args)
    raise AssertionError(args.command)


def _launch(launch: LaunchConfig, args: argparse.Namespace, console: Console) -> int:
    cmd = launch_command(launch, Path(args.cfg).resolve(), args.overrides)
    for warning in launch_warnings(launch):
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    check = plan_check_command(launch, Path(args.cfg).resolve(), args.overrides)
    if check is not None and not args.dry_run:
        # before the queue: a job that will not fit the cluster's GPUs is not submitted. In this process (the plan
        # needs torch and transformers either way); its refusal goes to stderr, the plan's table nowhere
        with contextlib.redirect_stdout(io.StringIO()):
            checked = _dispatch(build_parser().parse_args(check), console)
        if checked != 0:
            return checked
    print(shlex.join(cmd))
    return 0 if args.dry_run else subprocess.call(cmd, env=rank_environment())


def _show(resolved: dict[str, object], args: argparse.Namespace) -> int:
    """``resolved``: the experiment as a dict (config_to_dict)."""
    value: object = resolved
    for part in args.key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{args.cfg}: {args.key}: no such key")
        value = value[part]
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
