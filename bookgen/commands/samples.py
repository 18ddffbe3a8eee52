"""`bookgen samples --cfg exp.yaml`: the generation quality of every checkpoint a run still keeps (newest, best,
rotated ones on disk), so a user can pick the checkpoint that writes best, not only the lowest loss."""

from __future__ import annotations

import argparse
import dataclasses

import torch
from rich.console import Console
from rich.table import Table

from bookgen import distributed
from bookgen.checkpoint import folder as ckpt
from bookgen.checkpoint.compatibility import check_vocabulary
from bookgen.checkpoint.consolidate import load_checkpoint_model
from bookgen.checkpoint.spec import checkpoint_spec
from bookgen.config import ExperimentConfig
from bookgen.config_io import load_config
from bookgen.errors import BookgenError
from bookgen.fileio import read_json, write_json_atomic
from bookgen.generation.samples import SampleRound, quality_references, sample_round, sample_spec

COLUMNS = ("step", "eval loss", "stop rate", "length (valid)", "distinct-2", "repeated 4-grams", "copied 8-grams",
           "longest copy")


def samples_command(args: argparse.Namespace, console: Console) -> int:
    sample_checkpoints(load_config(args.cfg, args.overrides), console)
    return 0


def sample_checkpoints(cfg: ExperimentConfig, console: Console) -> list[SampleRound]:
    """Sample ``eval.samples`` rows (at least 1) from each complete checkpoint; print and save the measures."""
    checkpoints = checkpoint_spec(cfg, world_size=1)
    folders = ckpt.complete_checkpoints(checkpoints.root)
    if not folders:
        raise BookgenError(f"no complete checkpoint under {checkpoints.root}; train first")
    # one process samples each checkpoint's rebuilt, uncompiled model
    spec = dataclasses.replace(sample_spec(cfg), zero3=False, compiled=False)
    if spec.count < 1:
        spec = dataclasses.replace(spec, count=4)
    index, reference = quality_references(spec.prepared_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = distributed.discover({})
    rounds, table = [], Table(*COLUMNS, title=f"samples from {len(folders)} checkpoints ({spec.count} each)")
    for folder in folders:
        ckpt.read_marker(folder, checkpoints)
        check_vocabulary(folder, spec.prepared_dir)  # novelty and lengths are counted in the prepared data's ids
        model, tokenizer = load_checkpoint_model(folder)
        step = int(folder.name.removeprefix("step"))
        round_ = sample_round(model.to(device), tokenizer, spec, dist, step=step, index=index,
                              reference_lengths=reference)
        assert round_ is not None  # one process: rank 0
        rounds.append(round_)
        table.add_row(*_row(round_, read_json(folder / ckpt.MARKER).get("eval_loss")))
    console.print(table)
    out = cfg.run.output_dir / "samples_by_checkpoint.json"
    write_json_atomic(out, [{"step": r.step, **r.quality.to_dict(), "texts": [x.text for x in r.samples]}
                            for r in rounds])
    console.print(f"measures and texts: {out}")
    return rounds


def _row(r: SampleRound, eval_loss: float | None) -> list[str]:
    q = r.quality
    return [str(r.step), "-" if eval_loss is None else f"{eval_loss:.4f}", f"{q.stop_rate:.0%}",
            f"{q.length_median:.0f} ({q.reference_length_median:.0f})", f"{q.distinct_2:.3f}",
            f"{q.repeated_4gram_share:.1%}", f"{q.copied_8gram_share:.1%}", str(q.longest_copied_span)]
