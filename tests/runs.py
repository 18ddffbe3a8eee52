"""Finished runs several test modules share (made once per session by fixtures in conftest.py; tests copy
them, never change them)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bookgen.cli import main
from tests.helpers import REPO, write_experiment
from tests.ranks import launch

TRAINED_STEPS = 4
TRAINED_SETTINGS = {"train.max_steps": TRAINED_STEPS, "checkpoint.every": 2, "checkpoint.keep": 2, "eval.at_end": False}

LAUNCH_SETTINGS = {"train.max_steps": 5, "eval.at_end": False, "deepspeed.zero_stage": 2,
                   "deepspeed.config": str(REPO / "ds_configs/zero2.json")}  # the launcher tests' experiment

FINISHED_STEPS = 6
FINISHED_SETTINGS = {"train.max_steps": FINISHED_STEPS, "checkpoint.every": 3, "checkpoint.keep": 3, "eval.every": 3,
                     "eval.at_end": True, "eval.samples": 2, "generate.max_new_tokens": 8}


def trained_run(folder: Path) -> Path:
    """A finished single-rank run (checkpoints at steps 2 and 4) and its export."""
    exp = write_experiment(folder, TRAINED_SETTINGS, rows=120)
    launch(1, ["--cfg", str(exp)])
    assert main(["export", "--cfg", str(exp), "--out", str(folder / "export")]) == 0
    return folder


def finished_run(folder: Path) -> Path:
    """A finished single-rank run with evaluations and samples at steps 3 and 6."""
    launch(1, ["--cfg", str(write_experiment(folder, FINISHED_SETTINGS, rows=120))])
    return folder


def copy_trained_run(trained: Path, tmp_path: Path, overrides: dict | None = None) -> Path:
    """An experiment in ``tmp_path`` whose run folder is a copy of the trained one."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return write_experiment(tmp_path, TRAINED_SETTINGS | (overrides or {}), rows=120)
