"""What one experiment's checkpoints are, decided once from its config and handed to the checkpoint code.

Saving, resuming, choosing a checkpoint for eval/export/generate and checking one against this run all read
this object: the checkpoint code never looks at the experiment config itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bookgen.config import CheckpointConfig, ExperimentConfig
from bookgen.config_io import config_to_dict, model_fingerprint
from bookgen.data.batch_layout import BatchLayout
from bookgen.model.frozen_base import leaves_out_base


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointSpec:
    root: Path  # <run.output_dir>/checkpoints
    settings: CheckpointConfig  # every, keep, resume, keep_best, best_by
    fingerprint: str  # the model and tokenizer config (config_io.model_fingerprint)
    model: dict[str, Any]  # the model and tokenizer sections as recorded, to name what differs
    tokenizer: dict[str, Any]
    zero_stage: int
    precision: str
    seed: int
    global_batch: int  # at this run's world size
    prepared_dir: Path
    block_size: int
    packing: str
    group_by_length: bool
    lora: bool
    base_left_out: bool  # LoRA on a pretrained model: the checkpoints hold what trains
    base: str | None  # model.name_or_path: the base a LoRA checkpoint records
    counted_in_epochs: bool  # train.max_steps unset: a remapped position stays within its epoch


def checkpoint_spec(cfg: ExperimentConfig, world_size: int) -> CheckpointSpec:
    return CheckpointSpec(
        root=cfg.run.output_dir / "checkpoints", settings=cfg.checkpoint,
        fingerprint=model_fingerprint(cfg.model, cfg.tokenizer),
        model=config_to_dict(cfg.model), tokenizer=config_to_dict(cfg.tokenizer),
        zero_stage=cfg.deepspeed.zero_stage, precision=cfg.train.precision, seed=cfg.seed,
        global_batch=BatchLayout.of(cfg.train, world_size).global_batch, prepared_dir=cfg.prepared_dir,
        block_size=cfg.data.block_size, packing=cfg.data.packing, group_by_length=cfg.data.group_by_length,
        lora=cfg.model.lora is not None, base_left_out=leaves_out_base(cfg.model), base=cfg.model.name_or_path,
        counted_in_epochs=cfg.train.max_steps is None)
