"""Resume at another world size: DeepSpeed's universal checkpoint for ZeRO-1/2/3, a position by samples.

Optimizer partitions depend on the number of ranks, so a ZeRO-1/2/3 checkpoint is converted once (by
rank 0, with DeepSpeed's ``ds_to_universal``) into ``<checkpoint>/universal`` and loaded with
``"checkpoint": {"load_universal": true}``. Stage 0 keeps whole optimizer state and loads directly.
Not exact, and said so: the data position is mapped by samples seen (rounded down, so a few samples
may be seen twice, none skipped) and each rank's random streams restart from (seed, step, rank).
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bookgen.checkpoint.folder import MARKER
from bookgen.checkpoint.state import TrainState
from bookgen.distributed import DistEnv, broadcast_object
from bookgen.errors import BookgenError
from bookgen.fileio import read_json, staged_dir, write_json_atomic

UNIVERSAL_DIR = "universal"
DONE = "bookgen_universal.json"


def saved_world_size(folder: Path) -> int:
    marker = read_json(folder / MARKER)
    return int(marker["world_size"]) if isinstance(marker, dict) else -1


def needs_universal(folder: Path | None, zero_stage: int, dist: DistEnv) -> bool:
    """True when the engine must be built to load a universal checkpoint (converted here if needed)."""
    if folder is None or saved_world_size(folder) == dist.world_size:
        return False
    if zero_stage == 0:
        return False
    error = None
    if dist.is_main and not (folder / UNIVERSAL_DIR / DONE).is_file():
        error = _convert(folder)
    error = broadcast_object(error)
    if error:
        raise BookgenError(str(error))
    return True


def _convert(folder: Path) -> str | None:
    with staged_dir(folder / UNIVERSAL_DIR) as scratch:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(folder), "--output_folder", str(scratch)], capture_output=True, text=True)
        if proc.returncode != 0:
            return f"converting {folder} to a universal checkpoint failed:\n{proc.stderr[-3000:]}"
        write_json_atomic(scratch / DONE, {"source": folder.name})
    return None


def load_dir_and_tag(folder: Path, universal: bool) -> tuple[str, str]:
    return (str(folder), UNIVERSAL_DIR) if universal else (str(folder.parent), folder.name)


def remap_position(state: TrainState, old_global_batch: int, new_global_batch: int, steps_per_epoch: int, *,
                   counted_in_epochs: bool = False) -> TrainState:
    """The same epoch, at the step whose samples were all seen before (rounding down). With
    ``counted_in_epochs`` (the run's length is train.epochs) the step count is restated in steps of the
    new batch, so the run still ends after its epochs; with train.max_steps it stays the steps taken."""
    samples = state.step_in_epoch * old_global_batch
    step_in_epoch = min(samples // new_global_batch, steps_per_epoch)
    global_step = state.epoch * steps_per_epoch + step_in_epoch if counted_in_epochs else state.global_step
    return replace(state, step_in_epoch=step_in_epoch, global_step=global_step)


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible random streams for a rank whose saved streams belong to another layout."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    random.seed(mixed)
    np.random.seed(mixed)
