"""What a training run is, decided once per process before any data is touched, and handed on.

The experiment config is the user's input; :func:`resolve_run` reads it once, runs every preflight check
(bookgen.train.preflight: the refusals that need no data) and returns a frozen :class:`RunPlan`. The loop, the
model build, the engine and the checkpoints take the parts they use from it instead of deciding again: the
model's source and its Hugging Face config (loaded once), full fine-tuning or LoRA, the DeepSpeed config (built
once), the batch layout, the memory plan, what the checkpoints, the data, the loop's schedule and the samples
are (their specs), and the config sections the build reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bookgen.checkpoint.spec import CheckpointSpec, checkpoint_spec
from bookgen.config import ExperimentConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig
from bookgen.config_io import config_to_dict
from bookgen.data.batch_layout import BatchLayout
from bookgen.data.prepare import PrepareSpec
from bookgen.distributed import DistEnv
from bookgen.generation.samples import SampleSpec, sample_spec
from bookgen.model.source import ModelSource
from bookgen.planning.experiment import ExperimentPlan
from bookgen.train.preflight import check_fit, check_training


@dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """When the loop reads the device, evaluates, saves and stops early, and how it orders the data: decided
    once from the experiment's run, eval, checkpoint and data sections."""

    output_dir: Path  # the run folder
    log_every: int
    eval_every: int | None
    eval_at_end: bool
    eval_batch_size: int
    checkpoint_every: int | None
    patience: int | None  # eval.early_stopping_patience
    min_delta: float  # eval.early_stopping_min_delta
    seed: int
    group_by_length: bool
    precision: str  # named in the advice after a non-finite loss


@dataclass(frozen=True, kw_only=True, slots=True)
class RunPlan:
    model: ModelSource
    lora: LoraSettings | None  # None: full fine-tuning
    base_left_out: bool  # LoRA on a pretrained model: checkpoints hold the adapters, the base is rebuilt
    ds_config: dict[str, Any] = field(repr=False)  # DeepSpeed's, checked against the experiment
    layout: BatchLayout
    memory: ExperimentPlan | None = field(repr=False)  # what each rank will hold and a step's time (None: untraceable)
    checkpoints: CheckpointSpec  # where they go, what they record and how a resume is checked
    data: PrepareSpec  # the corpus, its split and tokenizer, and the prepared folder
    schedule: Schedule  # when the loop logs, evaluates, saves and stops early
    samples: SampleSpec  # what it samples and scores at each evaluation
    settings: ModelConfig  # the model section: how the model is built
    train: TrainConfig  # the optimisation section: the step, the engine, the schedule of the learning rate
    run: RunConfig  # the run folder, logging and trackers
    seed: int
    config_record: dict[str, Any] = field(repr=False)  # the resolved experiment, as the trackers record it

    @property
    def zero3(self) -> bool:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def resolve_run(cfg: ExperimentConfig, dist: DistEnv) -> RunPlan:
    """Every rank, before any data is touched: the checks, then the decisions (all ranks reach the same)."""
    checkpoints = checkpoint_spec(cfg, dist.world_size)
    source, ds_config = check_training(cfg, dist, checkpoints)
    memory = check_fit(cfg, dist, source, ds_config)
    schedule = Schedule(output_dir=cfg.run.output_dir, log_every=cfg.run.log_every, eval_every=cfg.eval.every,
                        eval_at_end=cfg.eval.at_end, eval_batch_size=cfg.eval.batch_size,
                        checkpoint_every=cfg.checkpoint.every, patience=cfg.eval.early_stopping_patience,
                        min_delta=cfg.eval.early_stopping_min_delta, seed=cfg.seed,
                        group_by_length=cfg.data.group_by_length, precision=cfg.train.precision)
    return RunPlan(memory=memory, model=source, lora=cfg.model.lora, base_left_out=checkpoints.base_left_out,
                   checkpoints=checkpoints, data=PrepareSpec.of(cfg), schedule=schedule, samples=sample_spec(cfg),
                   settings=cfg.model, train=cfg.train, run=cfg.run, seed=cfg.seed,
                   config_record=config_to_dict(cfg),
                   ds_config=ds_config,
                   layout=BatchLayout.of(cfg.train, dist.world_size))
