"""The `bookgen` command: prepare, train, eval, export, generate, samples, launch, show, runs, config-help.

`train` and `eval` run in this process as one rank, or as one of many when started by torchrun,
the deepspeed launcher or srun (see launcher/run.py, which calls :func:`main` too).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path


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
    gen.add_argument("--prompts", type=Path, default=None, help="prompt file: text (one per line) or .jsonl")
    gen.add_argument("--out", type=Path, default=None,
                     help="JSONL output (a .txt and a .quality.json are written beside it)")
    gen.add_argument("--force", action="store_true",
                     help="replace output files of those names that bookgen generate did not write")
    for flag, kind in (("top-k", int), ("top-p", float), ("temperature", float), ("repetition-penalty", float),
                       ("max-new-tokens", int), ("num-return-sequences", int), ("seed", int), ("batch-size", int)):
        gen.add_argument(f"--{flag}", type=kind, default=None)
    with_cfg(sub.add_parser("samples", help="generation quality of every checkpoint the run keeps"))
    runs = sub.add_parser("runs", help="run folders side by side: status, speed, perplexity, samples")
    runs.add_argument("folders", nargs="*", type=Path, metavar="FOLDER",
                      help="run folders, or folders of run folders (default: ./runs)")
    runs.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                      help="also draw the runs' validation losses on one chart")
    sub.add_parser("config-help", help="list every config key with its default and meaning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    from bookgen.errors import BookgenError

    try:
        return _dispatch(args, console)
    except BookgenError as exc:
        return _report(console, str(exc))
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop (which handles its own): no traceback
        console.print("interrupted", highlight=False)
        return 130
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        # a disk that filled up (or was remounted read-only) while running: say where, not a traceback
        return _report(console, f"{exc.filename or 'a file'}: {exc.strerror}; what was complete before is "
                                "untouched: free space and rerun the same command")


def _report(console, message: str) -> int:  # type: ignore[no-untyped-def]
    import os

    from rich.markup import escape

    from bookgen.distributed import discover

    dist = discover(os.environ)
    who = f" (rank {dist.rank} of {dist.world_size})" if dist.world_size > 1 else ""
    # escaped: a message may hold brackets (pip install 'bookgen[mlflow]', a list of keys) that are not markup
    console.print(f"[bold red]error{who}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 2


def _dispatch(args: argparse.Namespace, console) -> int:  # type: ignore[no-untyped-def]
    if args.command == "config-help":
        from bookgen.config_io import describe_fields

        for key, default, text in describe_fields():
            print(f"{key:32s} {default:24s} {text}")
        return 0
    if args.command == "runs":
        from bookgen.commands.runs import runs_command

        return runs_command(args.folders, args.plot, console)
    from bookgen.config_io import load_config

    if args.command == "generate":
        return _generate(args, console)
    cfg = load_config(args.cfg, args.overrides)
    if args.command == "prepare":
        return _prepare(cfg, args, console)
    if args.command == "train":
        from bookgen.train.loop import Invocation, train

        train(cfg, Invocation(Path(args.cfg).resolve(), tuple(args.overrides)))
        return 0
    if args.command == "samples":
        from bookgen.commands.samples import samples_command

        samples_command(cfg, console)
        return 0
    if args.command == "eval":
        from bookgen.commands.eval import evaluate_only

        evaluate_only(cfg, args.split, args.checkpoint)
        return 0
    if args.command == "launch":
        return _launch(cfg, args, console)
    if args.command == "show":
        return _show(cfg, args)
    if args.command == "export":
        return _export(cfg, args, console)
    raise AssertionError(args.command)


def _launch(cfg, args: argparse.Namespace, console) -> int:  # type: ignore[no-untyped-def]
    import shlex
    import subprocess

    from bookgen.commands.launch import launch_command, launch_warnings, rank_environment

    cmd = launch_command(cfg, Path(args.cfg).resolve(), args.overrides)
    for warning in launch_warnings(cfg):
        console.print(f"[yellow]warning: {warning}[/]", highlight=False)
    print(shlex.join(cmd))
    return 0 if args.dry_run else subprocess.call(cmd, env=rank_environment())


def _show(cfg, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from bookgen.config_io import config_to_dict
    from bookgen.errors import ConfigError

    value: object = config_to_dict(cfg)
    for part in args.key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{args.cfg}: {args.key}: no such key")
        value = value[part]
    print(value)
    return 0


def _export(cfg, args: argparse.Namespace, console) -> int:  # type: ignore[no-untyped-def]
    from bookgen.checkpoint.export import export
    from bookgen.checkpoint.folder import checkpoint_root, resolve
    from bookgen.errors import BookgenError

    folder = resolve(cfg, args.checkpoint)
    if folder is None:
        raise BookgenError(f"no complete checkpoint under {checkpoint_root(cfg)}; train first or pass --checkpoint")
    out = export(folder, args.out, force=args.force, max_shard_size=args.max_shard_size,
                 adapter_only=args.adapter_only)
    console.print(f"exported {folder}{' (the LoRA adapter)' if args.adapter_only else ''} to {out}")
    return 0


def _generate(args: argparse.Namespace, console) -> int:  # type: ignore[no-untyped-def]
    from bookgen.commands.generate import run_generation, settings_from
    from bookgen.config_io import load_config, load_generate_overrides
    from bookgen.errors import BookgenError
    from bookgen.generation.sampling import check_output_paths, read_prompts

    if args.cfg is None and args.model is None:
        raise BookgenError("generate needs --model DIR (an exported folder) or --cfg EXP.yaml")
    cfg = load_config(args.cfg, args.overrides) if args.cfg else None
    base = cfg.generate if cfg else load_generate_overrides(args.overrides)
    flags = {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "repetition_penalty", "max_new_tokens",
                                           "num_return_sequences", "seed", "batch_size")}
    settings = settings_from(base, flags)
    prompts = read_prompts(args.prompts) if args.prompts else (args.prompt or [base.prompt])
    if any(p is not None and not p.strip() for p in prompts):
        raise BookgenError("an empty prompt was given; leave --prompt out to start a summary from nothing")
    seed = settings.seed if settings.seed is not None else (cfg.seed if cfg else 0)
    out = args.out or ((cfg.run.output_dir if cfg else Path(".")) / "generated.jsonl")
    check_output_paths(out, inputs=[p for p in (args.prompts, args.model) if p is not None], force=args.force)
    run_generation(cfg=cfg, model_dir=args.model, checkpoint=args.checkpoint, prompts=prompts, settings=settings,
                   seed=seed, out=out)
    return 0


def _prepare(cfg, args: argparse.Namespace, console) -> int:  # type: ignore[no-untyped-def]
    from bookgen.data.prepare import prepare
    from bookgen.data.sources import download

    if args.download:
        target = cfg.data.source if cfg.data.source.name.endswith(".tar.gz") else (
            cfg.data.source.parent / "booksummaries.tar.gz")
        download(cfg.data.download_url, target, cfg.data.download_sha256)
        cfg.data.source = target
    start = time.perf_counter()
    report = prepare(cfg, verify=args.verify)
    took = time.perf_counter() - start
    what = ", ".join(report.rebuilt) if report.rebuilt else "nothing (inputs unchanged)"
    console.print(f"prepared {cfg.prepared_dir} in {took:.2f}s; rebuilt: {what}")
    console.print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report.seconds.items() if k != "total"))
    console.print(f"rows read: {report.rows_read:,}")
    console.print("documents: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
    console.print("tokens: " + ", ".join(f"{k}={v:,}" for k, v in report.tokens.items()) + "; shards: "
                  + ", ".join(f"{k}={v}" for k, v in report.shards.items()))
    if report.skipped_empty or report.skipped_malformed or report.bad_genres:
        console.print(f"skipped: {report.skipped_empty} empty summaries, {report.skipped_malformed} malformed "
                      f"rows; {report.bad_genres} rows with unreadable genres (kept)")
    console.print(f"numbers recorded in {cfg.prepared_dir / 'report.json'}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
