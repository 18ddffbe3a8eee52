"""Shared test helpers: the repository's paths and tiny experiments written to real files."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "booksummaries.txt"
SHARED_CMU = REPO.parent / "shared" / "data" / "booksummaries_head6.txt"


def write_experiment(folder: Path, overrides: dict | None = None, *, rows: int | None = None) -> Path:
    """A tiny experiment YAML in ``folder``; ``rows`` copies only the first rows of the sample corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    source = SAMPLE
    if rows is not None:
        source = folder / "booksummaries.txt"
        source.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]))
    cfg = {
        "seed": 7,
        "run": {"output_dir": "run"},
        "data": {"source": str(source), "block_size": 64},
        "tokenizer": {"vocab_size": 400},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "dropout": 0.0},
        "train": {"micro_batch_size": 2, "learning_rate": 1e-3, "max_steps": 4},
        "eval": {"batch_size": 4, "at_end": True},
        "deepspeed": {"zero_stage": 0},
    }
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
