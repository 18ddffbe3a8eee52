"""`bookgen prepare`: split, tokenize and store the corpus (training does it too, when needed)."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from bookgen.config_io import load_config
from bookgen.data.prepare import prepare
from bookgen.data.sources import download


def prepare_command(args: argparse.Namespace, console: Console) -> int:
    cfg = load_config(args.cfg, args.overrides)
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
    if report.rows_cut:
        console.print(f"prompt-completion rows longer than data.block_size {cfg.data.block_size} (their summary's "
                      "end cut): " + ", ".join(f"{k}={v:,}" for k, v in report.rows_cut.items()) + "; with no room "
                      "for any of the summary after the prompt (no target): "
                      + ", ".join(f"{k}={v:,}" for k, v in report.rows_without_room.items()), highlight=False)
    console.print(f"numbers recorded in {cfg.prepared_dir / 'report.json'}", highlight=False)
    return 0
