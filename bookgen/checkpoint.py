"""ZeRO checkpoints that are complete before anything points at them, and exact resume.

Layout under ``<output_dir>/checkpoints``::

    step00000040/            DeepSpeed's files (all ranks), plus
        rng_rank<R>.pt       each rank's RNG states (DeepSpeed keeps only rank 0's client state)
        hf/                  model config and tokenizer, so export needs nothing else
        COMPLETE.json        written by rank 0 after every rank finished: train state, config fingerprint
    latest_complete          name of the newest complete checkpoint, replaced atomically
    best_complete            with checkpoint.keep_best: the complete one with the lowest validation loss

DeepSpeed's own ``latest`` file is not used: rank 0 writes it before the other ranks have finished,
so a kill during a save could leave it naming an incomplete checkpoint.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from bookgen import faults
from bookgen.config import ExperimentConfig
from bookgen.config_io import RUNTIME_MODEL_KEYS, config_to_dict, model_fingerprint
from bookgen.distributed import DistEnv, barrier, broadcast_object, gather_errors
from bookgen.errors import BookgenError
from bookgen.fileio import read_json, write_json_atomic, write_text_atomic
from bookgen.layout import BatchLayout

POINTER = "latest_complete"
BEST_POINTER = "best_complete"
MARKER = "COMPLETE.json"


@dataclass(slots=True)
class TrainState:
    """Where training stands: enough, with the RNG files, to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in ``epoch``
    # early stopping, kept here so that it survives a resume
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_since_best: int = 0

    def note_eval(self, loss: float, min_delta: float) -> None:
        """Count an evaluation: a new best resets the count of evaluations without improvement."""
        if self.best_eval_loss is None or loss < self.best_eval_loss - min_delta:
            self.best_eval_loss, self.best_eval_step, self.evals_since_best = loss, self.global_step, 0
        else:
            self.evals_since_best += 1


def checkpoint_root(cfg: ExperimentConfig) -> Path:
    return cfg.run.output_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, cfg: ExperimentConfig, dist: DistEnv, state: TrainState, hf_files: Any,
         eval_loss: float | None = None) -> Path:
    """All ranks call this with the same state; ``eval_loss`` is the validation loss at this step, if
    one was just computed. Returns the checkpoint folder."""
    root = checkpoint_root(cfg)
    tag = tag_for(state.global_step)
    folder = root / tag
    # a rerun of a finished run ends at a step that is saved already: keep that checkpoint rather than
    # remove it to save the same weights again (a kill during that save would leave none)
    if broadcast_object((folder / MARKER).is_file() if dist.is_main else None):
        return folder
    error: str | None = None
    try:
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a leftover from an interrupted save of the same step
                shutil.rmtree(folder)
        barrier()
        client = {"bookgen_state": asdict(state), "bookgen_fingerprint": model_fingerprint(cfg),
                  # lets DeepSpeed's ds_to_universal convert the checkpoint for another world size
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        torch.save(_rng_state(), folder / f"rng_rank{dist.rank}.pt")
        faults.inject("save", state.global_step, dist.rank)
        if dist.is_main:
            hf_files(folder / "hf")
    except OSError as exc:
        error = f"rank {dist.rank}: cannot write checkpoint {folder}: {exc}"
    # every rank learns whether any rank failed, so none of them marks a broken checkpoint complete
    errors = gather_errors(error)
    if errors:
        raise BookgenError("; ".join(errors) + ". Earlier checkpoints are untouched.")
    if dist.is_main:
        write_json_atomic(folder / MARKER, {
            "state": asdict(state), "world_size": dist.world_size, "zero_stage": cfg.deepspeed.zero_stage,
            "global_batch": BatchLayout.of(cfg.train, dist.world_size).global_batch,
            "files": _file_sizes(folder),
            "fingerprint": model_fingerprint(cfg),
            "model": config_to_dict(cfg.model), "tokenizer": config_to_dict(cfg.tokenizer),
            "data": {"block_size": cfg.data.block_size, "packing": cfg.data.packing},
            "eval_loss": eval_loss,
        })
        write_text_atomic(root / POINTER, tag + "\n")
        _prune(root, cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best)
    barrier()
    return folder


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file's size, recorded in the marker: a truncated file is then found (and named) before loading."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def check_files(folder: Path) -> None:
    """Raise, naming the file and the previous complete checkpoint, when a file recorded at save time is
    missing or has another size (a truncated copy, a disk that filled up after the save)."""
    marker = read_json(folder / MARKER)
    sizes = marker.get("files") if isinstance(marker, dict) else None
    for name, size in (sizes or {}).items():
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes, {size} were saved"
            raise BookgenError(f"{path} {what}: checkpoint {folder.name} is damaged. {_previous_hint(folder)}")


def _previous_hint(folder: Path) -> str:
    earlier = [p for p in complete_checkpoints(folder.parent) if p.name < folder.name]
    if not earlier:
        return "No earlier complete checkpoint is left; restore the file or start again with checkpoint.resume: never."
    return f"Resume from the previous complete one with --set checkpoint.resume={earlier[-1]}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and (p / MARKER).is_file())


def newest_complete(cfg: ExperimentConfig) -> Path | None:
    done = complete_checkpoints(checkpoint_root(cfg))
    return done[-1] if done else None


def best_complete(root: Path) -> Path | None:
    """The complete checkpoint with the lowest recorded validation loss (the earlier one on a tie)."""
    return _lowest_eval_loss(complete_checkpoints(root))


def _lowest_eval_loss(folders: list[Path]) -> Path | None:
    scored = [(loss, p) for p in folders if isinstance(loss := read_json(p / MARKER).get("eval_loss"), int | float)]
    return min(scored, key=lambda item: (item[0], item[1].name))[1] if scored else None


def _prune(root: Path, keep: int, *, keep_best: bool) -> None:
    done = complete_checkpoints(root)
    best = _lowest_eval_loss(done) if keep_best else None
    for old in done[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    if best is not None:
        write_text_atomic(root / BEST_POINTER, best.name + "\n")
    newest = done[-1].name if done else ""
    for partial in root.iterdir():  # interrupted saves older than the newest complete one
        if partial.is_dir() and partial.name.startswith("step") and partial.name < newest and partial not in done:
            shutil.rmtree(partial, ignore_errors=True)


def find_resume(cfg: ExperimentConfig) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (or None) and notes to print about what was passed over."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None, []
    if mode != "auto":
        folder = Path(mode)
        check_resume_folder(folder)
        check_files(folder)
        return folder, []
    root = checkpoint_root(cfg)
    done = complete_checkpoints(root)
    notes = []
    pointer = root / POINTER
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named and not (root / named / MARKER).is_file():
        notes.append(f"checkpoint {named} is incomplete; ignoring it")
    incomplete = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")
                  and not (p / MARKER).is_file()] if root.is_dir() else []
    if done and any(name > done[-1].name for name in incomplete):
        notes.append(f"checkpoint {max(incomplete)} is incomplete (interrupted save); "
                     f"resuming from the previous complete one, {done[-1].name}")
    if done:
        check_files(done[-1])
    return (done[-1] if done else None), notes


def check_resume_folder(folder: Path) -> None:
    """checkpoint.resume names a folder: it must exist and be a complete checkpoint."""
    if not folder.exists():
        raise BookgenError(f"checkpoint.resume: {folder} does not exist (a relative path is read from the "
                           "experiment file's folder)")
    if not (folder / MARKER).is_file():
        raise BookgenError(f"checkpoint.resume: {folder} is not a complete bookgen checkpoint "
                           f"(no {MARKER}; an interrupted save, or not a checkpoint folder?)")


def resolve(cfg: ExperimentConfig, choice: str | None) -> Path | None:
    """A checkpoint to read from, for eval, export and generate: ``latest`` (or None: the newest complete
    one; None when the run has none), ``best`` (lowest validation loss) or a folder."""
    root = checkpoint_root(cfg)
    if choice in (None, "latest"):
        return newest_complete(cfg)
    if choice == "best":
        best = best_complete(root)
        if best is None:  # asked for by name: never fall back to another model
            raise BookgenError(f"--checkpoint best: no checkpoint under {root} has a validation loss; train with "
                               "checkpoint.keep_best: true (or pass a folder)")
        return best
    folder = Path(choice)
    if not (folder / MARKER).is_file():
        raise BookgenError(f"--checkpoint: {folder} is not a complete bookgen checkpoint (no {MARKER})")
    return folder


def read_marker(folder: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The checkpoint's record, refused when the model or tokenizer config differs from ``cfg``."""
    marker = read_json(folder / MARKER)
    if not isinstance(marker, dict):
        raise BookgenError(f"{folder / MARKER}: unreadable checkpoint marker")
    if marker["fingerprint"] != model_fingerprint(cfg):
        diffs = _diff("model", marker["model"], config_to_dict(cfg.model))
        diffs += _diff("tokenizer", marker["tokenizer"], config_to_dict(cfg.tokenizer))
        raise BookgenError(f"{folder} was made with another model or tokenizer: " + "; ".join(diffs)
                           + ". Use another run.output_dir or checkpoint.resume: never.")
    return marker


def check_compatible(folder: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    marker = read_marker(folder, cfg)
    if marker["zero_stage"] != cfg.deepspeed.zero_stage:
        raise BookgenError(f"{folder} was saved under ZeRO stage {marker['zero_stage']}, this run uses "
                           f"deepspeed.zero_stage {cfg.deepspeed.zero_stage}")
    saved = saved_layout(marker)
    now = (cfg.data.packing, cfg.data.block_size)
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


def _diff(section: str, saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{section}.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if k not in RUNTIME_MODEL_KEYS and saved.get(k) != now.get(k)]


def _apply_schedule_at_loaded_step(scheduler: Any) -> None:
    """The loaded scheduler state carries the learning rate the saving run computed for its next step.
    Recompute it with this run's schedule, which differs when the run is extended (more steps or
    epochs): otherwise the first resumed step would use the old schedule's rate (0 at a linear end)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def load(engine: Any, folder: Path, cfg: ExperimentConfig, dist: DistEnv, *, steps_per_epoch: int,
         universal: bool = False) -> TrainState:
    """Restore engine (weights, optimizer, scheduler), this rank's RNG, and the train state.

    With another global batch (world size, micro-batch or accumulation) the position is mapped by samples
    seen (see bookgen.reshard); at another world size the RNG is reseeded.
    """
    from bookgen import reshard

    marker = check_compatible(folder, cfg)
    load_dir, tag = reshard.load_dir_and_tag(folder, universal)
    try:
        path, _client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:  # torch names no file for a truncated one
        raise BookgenError(f"{folder}: cannot load this checkpoint ({type(exc).__name__}: {str(exc)[:300]}). "
                           + _previous_hint(folder)) from exc
    if path is None:
        raise BookgenError(f"DeepSpeed could not load {folder}")
    state = TrainState(**marker["state"])
    layout = BatchLayout.of(cfg.train, dist.world_size)
    if marker["global_batch"] != layout.global_batch:
        state = reshard.remap_position(state, marker["global_batch"], layout.global_batch,
                                       steps_per_epoch, counted_in_epochs=cfg.train.max_steps is None)
        engine.lr_scheduler.last_epoch = state.global_step
    _apply_schedule_at_loaded_step(engine.lr_scheduler)
    if marker["world_size"] == dist.world_size:
        _set_rng_state(torch.load(folder / f"rng_rank{dist.rank}.pt", weights_only=True))
    else:
        reshard.reseed(cfg.seed, state.global_step, dist.rank)
    # all ranks must agree on where they are
    agreed = broadcast_object(asdict(state))
    if agreed != asdict(state):
        raise BookgenError(f"rank {dist.rank} read another train state from {folder} than rank 0")
    return state
