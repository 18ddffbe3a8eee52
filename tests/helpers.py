"""Shared test helpers: the repository's paths and tiny experiments written to real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.ranks import rank_env, warm

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


def run_cli(args: list[str], cwd: Path | None = None, user: bool = False) -> subprocess.CompletedProcess[str]:
    """`bookgen ARGS` in a process of its own (forked warm, see tests/warm_ranks.py); ``user``: in a fresh
    process as an unprivileged user when this runs as root (root writes into read-only folders, so
    permission mistakes only show as another user)."""
    cmd = [sys.executable, "-m", "bookgen.cli", *args]
    env = rank_env({"PYTHONPATH": str(REPO)})
    as_user = user and os.geteuid() == 0
    if not as_user and warm():  # PYTHONPATH is this checkout, which the fork server imports from
        from tests import warm_ranks

        return warm_ranks.cli(args, env=env, cwd=cwd or REPO, timeout=300)
    if as_user:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        # a home of its own: DeepSpeed compiles its shared-memory op into ~/.cache on start, and a cache
        # that root wrote into is not writable for this user
        env["HOME"] = str(home_of_nobody())
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=300, env=env)


def home_of_nobody() -> Path:
    home = Path("/tmp/bookgen-test-home-65534")
    if not home.is_dir():
        home.mkdir(mode=0o755, exist_ok=True)  # two test workers may both get here
        os.chown(home, 65534, 65534)
    return home


def world_readable_tmp(tmp_path: Path) -> Path:
    """A folder another user can enter (pytest's own tmp folders are private to their owner)."""
    folder = Path("/tmp") / f"bookgen-test-{os.getpid()}-{tmp_path.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    return folder


def load_experiment(tmp_path: Path, ds: dict | None = None, **overrides):
    """The typed config of a tiny experiment; ``ds``: a DeepSpeed JSON written beside it and used."""
    from bookgen.config_io import load_config

    cfg = load_config(write_experiment(tmp_path, overrides))
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        cfg.deepspeed.config = tmp_path / "ds.json"
    return cfg


def model_for(cfg, tokenizer, **kwargs):
    """The model an experiment builds (what the training run passes bookgen.model.build.build_model)."""
    from bookgen.model.build import build_model

    return build_model(cfg.model, tokenizer, seed=cfg.seed, loss_chunk_tokens=cfg.train.loss_chunk_tokens, **kwargs)


def ds_config_for(cfg, world_size: int) -> dict:
    """The DeepSpeed config an experiment resolves to, its ZeRO-3 buckets sized by the model source's width."""
    from bookgen.train.ds_config import build_ds_config
    from bookgen.train.preflight import model_source

    return build_ds_config(cfg.deepspeed, cfg.train, world_size, width=model_source(cfg.model).width)


def check_model_of(cfg, dist=None, **kwargs) -> None:
    """bookgen.train.preflight.check_model on an experiment's sections, as preflight calls it."""
    from bookgen.train.preflight import check_model

    check_model(cfg.model, block_size=cfg.data.block_size, zero_stage=cfg.deepspeed.zero_stage, dist=dist, **kwargs)
