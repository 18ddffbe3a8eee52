"""Resume in one place: which checkpoint, planned before the engine exists, and the restore after it.

:func:`plan_resume` picks the folder (``checkpoint.resume``), checks its files, and decides whether the engine
must load a universal checkpoint (another world size, :mod:`bookgen.checkpoint.reshard`); :func:`restore` loads the
weights, optimizer, schedule and RNG into the engine and returns the :class:`TrainState` the loop continues
from, with the position mapped by samples when the global batch changed.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from bookgen.checkpoint import folder as ckpt
from bookgen.checkpoint import reshard
from bookgen.checkpoint.compatibility import check_epoch_order, check_vocabulary
from bookgen.checkpoint.folder import previous_hint
from bookgen.checkpoint.spec import CheckpointSpec
from bookgen.checkpoint.state import TrainState
from bookgen.distributed import DistEnv, broadcast_object, gather_errors
from bookgen.errors import BookgenError
from bookgen.model.frozen_base import RECORD_KEY, check_base


@dataclass(frozen=True, slots=True)
class ResumePlan:
    folder: Path | None  # None: a fresh start
    universal: bool  # load through DeepSpeed's universal checkpoint (saved at another world size)
    notes: list[str] = field(default_factory=list)  # what was passed over, to print
    marker: dict[str, Any] | None = None  # the checkpoint's record, checked against this run's config


def plan_resume(spec: CheckpointSpec, dist: DistEnv) -> ResumePlan:
    """Before the engine exists: the checkpoint to resume from, converted for this world size if needed."""
    folder, notes = ckpt.find_resume(spec)
    marker = None
    if folder is not None:  # every refusal before the engine is built
        _check_files_on_all_ranks(folder, dist)
        marker = check_compatible(folder, spec)
        check_vocabulary(folder, spec.prepared_dir)
        if RECORD_KEY in marker:  # the run rebuilds the frozen base the checkpoint left out
            check_base(marker[RECORD_KEY], folder)
        for change in check_epoch_order(folder, marker, spec):
            notes.append(f"{folder} was saved at an epoch's end; {change} differs from then, which takes effect "
                         "from this epoch on")
    return ResumePlan(folder, reshard.needs_universal(folder, spec.zero_stage, dist), notes, marker)


def _check_files_on_all_ranks(folder: Path, dist: DistEnv) -> None:
    """Sizes and CRC-32s of the checkpoint's files, the hashing striped over the ranks; all stop together."""
    error = None
    try:
        ckpt.check_files(folder, dist.rank, dist.world_size)
    except BookgenError as exc:
        error = str(exc)
    errors = gather_errors(error)
    if errors:
        raise BookgenError(errors[0])


def restore(engine: Any, plan: ResumePlan, spec: CheckpointSpec, dist: DistEnv, console: Console, *,
            steps_per_epoch: int) -> TrainState:
    """After the engine is built: load the planned checkpoint (or start fresh) and say what happened."""
    for note in plan.notes:
        console.print(f"[yellow]{note}[/]")
    if plan.folder is None or plan.marker is None:
        return TrainState()
    folder, saved = plan.folder, plan.marker
    state, optimizer_changes = _load(engine, folder, saved, spec, dist, steps_per_epoch=steps_per_epoch,
                                     universal=plan.universal)
    global_batch = spec.global_batch
    if saved["world_size"] != dist.world_size:
        console.print(f"[yellow]{folder} was saved by {saved['world_size']} ranks, this run has {dist.world_size}: "
                      f"{'loaded through a universal checkpoint; ' if plan.universal else ''}the data position is "
                      "mapped by samples seen and the random streams restart, so this run is not bit-exact[/]")
    elif saved["global_batch"] != global_batch:
        console.print(f"[yellow]{folder} was saved with a global batch of {saved['global_batch']}, this run's is "
                      f"{global_batch}: the data position is mapped by samples seen (rounded down: a few samples "
                      "may be seen twice, none skipped)[/]")
    for change in optimizer_changes:
        console.print(f"[yellow]{change}: the run goes on with this run's value[/]")
    console.print(f"resumed from {folder} at step {state.global_step} (epoch {state.epoch}, "
                  f"step {state.step_in_epoch} of the epoch)")
    return state


def check_compatible(folder: Path, spec: CheckpointSpec) -> dict[str, Any]:
    marker = ckpt.read_marker(folder, spec)
    if marker["zero_stage"] != spec.zero_stage:
        raise BookgenError(f"{folder} was saved under ZeRO stage {marker['zero_stage']}, this run uses "
                           f"deepspeed.zero_stage {spec.zero_stage}")
    precision = marker.get("precision")  # recorded since this check; older markers load as they did
    if precision is not None and precision != spec.precision:
        raise BookgenError(f"{folder} was saved under train.precision {precision}, this run uses "
                           f"{spec.precision}: DeepSpeed lays out the optimizer state per precision. Resume "
                           f"with --set train.precision={precision}, or start a new run from its weights "
                           "(bookgen export, then model.name_or_path: <that folder>)")
    saved = saved_layout(marker)
    now = (spec.packing, spec.block_size)
    if saved != now and marker["state"]["step_in_epoch"] != 0:
        # the examples of an epoch (rows, blocks) are another list: a mid-epoch position means nothing there
        raise BookgenError(f"{folder} was saved mid-epoch with data.packing {saved[0]!r} and data.block_size "
                           f"{saved[1]}; this run has {now[0]!r} and {now[1]}. Change them only at an epoch's "
                           "end, or resume with the saved values")
    return marker


def saved_layout(marker: dict[str, Any]) -> tuple[str, int]:
    """(data.packing, data.block_size) a checkpoint was trained with; old markers kept packing as a bool."""
    data = marker.get("data", {})
    packing = data.get("packing", "none")
    if isinstance(packing, bool):
        packing = "concat" if packing else "none"
    return packing, int(data.get("block_size", 0))


HYPERPARAMETERS = {"weight_decay": "train.weight_decay", "betas": "train.adam_betas", "eps": "train.adam_eps"}


@dataclass(frozen=True, slots=True)
class OptimizerSettings:
    """The engine's optimizer settings as this run built them (per parameter group, whatever grouping the
    ZeRO stage made of engine.param_groups), taken before a checkpoint's state replaces them."""

    base_lrs: list[float]
    groups: list[dict[str, Any]]

    @classmethod
    def of(cls, scheduler: Any) -> OptimizerSettings:
        return cls(list(scheduler.base_lrs),
                   [{key: g[key] for key in HYPERPARAMETERS} for g in scheduler.optimizer.param_groups])


def apply_optimizer_settings(scheduler: Any, built: OptimizerSettings) -> list[str]:
    """The loaded optimizer and scheduler carry the saving run's peak learning rate, weight decay, betas
    and epsilon; put back this run's (``built``), so that a changed `train.*` value takes effect (lowering
    the learning rate of a run whose loss spikes is the common case) instead of being silently ignored.
    Unchanged values are set to what they were: an exact resume stays exact. Returns what changed."""
    groups = scheduler.optimizer.param_groups
    compared = {"train.learning_rate": (list(scheduler.base_lrs), built.base_lrs)}
    for key, name in HYPERPARAMETERS.items():  # betas come back from a checkpoint as a list or a tuple
        compared[name] = ([_plain(g[key]) for g in groups], [_plain(g[key]) for g in built.groups])
    changed = []
    for name, (loaded, wanted) in compared.items():
        differs = next((i for i, (a, b) in enumerate(zip(loaded, wanted, strict=True)) if a != b), None)
        if differs is not None:
            changed.append(f"{name}: {loaded[differs]} in the checkpoint, {wanted[differs]} now")
    scheduler.base_lrs = list(built.base_lrs)
    for group, settings in zip(groups, built.groups, strict=True):
        group.update(settings)
    return changed


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _apply_schedule_at_loaded_step(scheduler: Any) -> None:
    """The loaded scheduler state carries the learning rate the saving run computed for its next step.
    Recompute it with this run's schedule, which differs when the run is extended (more steps or
    epochs): otherwise the first resumed step would use the old schedule's rate (0 at a linear end)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load(engine: Any, folder: Path, marker: dict[str, Any], spec: CheckpointSpec, dist: DistEnv, *,
          steps_per_epoch: int, universal: bool) -> tuple[TrainState, list[str]]:
    """Restore engine (weights, optimizer, scheduler), this rank's RNG, and the train state from the checkpoint
    whose record (``marker``) the plan checked; also return the optimizer settings this run changed.

    With another global batch (world size, micro-batch or accumulation) the position is mapped by samples
    seen (see bookgen.checkpoint.reshard); at another world size the RNG is reseeded.
    """
    load_dir, tag = reshard.load_dir_and_tag(folder, universal)
    built = OptimizerSettings.of(engine.lr_scheduler)
    try:
        # a checkpoint without its frozen base lacks those weights, which the model was built with
        path, _client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True,
                                               load_module_strict=RECORD_KEY not in marker)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # torch names no file
        raise BookgenError(f"{folder}: cannot load this checkpoint ({type(exc).__name__}: {str(exc)[:300]}). "
                           + previous_hint(folder)) from exc
    if path is None:
        raise BookgenError(f"DeepSpeed could not load {folder}")
    state = TrainState(**marker["state"])
    if marker["global_batch"] != spec.global_batch:
        state = reshard.remap_position(state, marker["global_batch"], spec.global_batch,
                                       steps_per_epoch, counted_in_epochs=spec.counted_in_epochs)
        engine.lr_scheduler.last_epoch = state.global_step
    changed = apply_optimizer_settings(engine.lr_scheduler, built)
    _apply_schedule_at_loaded_step(engine.lr_scheduler)
    if marker["world_size"] == dist.world_size:
        _set_rng_state(torch.load(folder / f"rng_rank{dist.rank}.pt", weights_only=True))
    else:
        reshard.reseed(spec.seed, state.global_step, dist.rank)
    # all ranks must agree on where they are
    agreed = broadcast_object(asdict(state))
    if agreed != asdict(state):
        raise BookgenError(f"rank {dist.rank} read another train state from {folder} than rank 0")
    return state, changed
