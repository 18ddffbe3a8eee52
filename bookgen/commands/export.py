"""`bookgen export`: a Hugging Face folder from a checkpoint (the merged model, or a LoRA run's adapter)."""

from __future__ import annotations

import argparse

from rich.console import Console

from bookgen.checkpoint.export import export
from bookgen.checkpoint.folder import resolve
from bookgen.checkpoint.spec import checkpoint_spec
from bookgen.config_io import load_config
from bookgen.errors import BookgenError


def export_command(args: argparse.Namespace, console: Console) -> int:
    cfg = load_config(args.cfg, args.overrides)
    root = checkpoint_spec(cfg, world_size=1).root
    folder = resolve(root, cfg.checkpoint.best_by, args.checkpoint)
    if folder is None:
        raise BookgenError(f"no complete checkpoint under {root}; train first or pass --checkpoint")
    out = export(folder, args.out, force=args.force, max_shard_size=args.max_shard_size,
                 adapter_only=args.adapter_only)
    console.print(f"exported {folder}{' (the LoRA adapter)' if args.adapter_only else ''} to {out}")
    return 0
