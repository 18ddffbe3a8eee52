"""`bookgen train`: one rank of a training run (launcher/run.py starts the same under every launcher)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from bookgen.config_io import load_config
from bookgen.train.loop import Invocation, train


def train_command(args: argparse.Namespace, console: Console) -> int:
    cfg = load_config(args.cfg, args.overrides)
    train(cfg, Invocation(Path(args.cfg).resolve(), tuple(args.overrides)))
    return 0
