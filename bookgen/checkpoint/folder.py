"""ZeRO checkpoints that are complete before anything points at them, and exact resume.

Layout under ``<output_dir>/checkpoints``::

    step00000040/            DeepSpeed's files (all ranks), plus
        rng_rank<R>.pt       each rank's RNG states (DeepSpeed keeps only rank 0's client state)
        hf/                  model config and tokenizer, so export needs nothing else
        COMPLETE.json        written by rank 0 after every rank finished: train state, config fingerprint
    latest_complete          name of the newest complete checkpoint, replaced atomically
    best_complete            with checkpoint.keep_best: the best complete one by checkpoint.best_by

DeepSpeed's own ``latest`` file is not used: rank 0 writes it before the other ranks have finished,
so a kill during a save could leave it naming an incomplete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bookgen.checkpoint.compatibility import train_split_digest
from bookgen.checkpoint.spec import CheckpointSpec
from bookgen.checkpoint.state import TrainState
from bookgen.config_io import RUNTIME_MODEL_KEYS
from bookgen.deepspeed_import import load_deepspeed
from bookgen.distributed import DistEnv, barrier, broadcast_object, gather_errors, gather_objects
from bookgen.errors import BookgenError
from bookgen.faults import Fault
from bookgen.fileio import crc32_file, read_json, write_json_atomic, write_text_atomic
from bookgen.model.frozen_base import RECORD_KEY, base_record
from bookgen.model.lora import ADAPTER_CONFIG

POINTER = "latest_complete"
BEST_POINTER = "best_complete"
MARKER = "COMPLETE.json"
MODE_KEY = "mode"  # in COMPLETE.json: full fine-tuning or LoRA, and whether the base was left out


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


def save(engine: Any, spec: CheckpointSpec, dist: DistEnv, state: TrainState, hf_files: Any,
         eval_loss: float | None = None, fault: Fault | None = None, scores: dict[str, float] | None = None
         ) -> Path:
    """All ranks call this with the same state; ``eval_loss`` is the validation loss at this step, if
    one was just computed, ``scores`` its ROUGE scores (prompt runs); ``fault``: the failure tests'
    (bookgen.faults). Returns the checkpoint folder."""
    root = spec.root
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
        ds = load_deepspeed("checkpoint.constants")  # here: importing DeepSpeed costs commands seconds

        client = {"bookgen_state": asdict(state), "bookgen_fingerprint": spec.fingerprint,
                  # lets DeepSpeed's ds_to_universal convert the checkpoint for another world size
                  ds.UNIVERSAL_CHECKPOINT_INFO: {
                      ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        # a LoRA run's pretrained base never changes: its checkpoints hold what trains (see model/frozen_base.py)
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=spec.base_left_out)
        torch.save(_rng_state(), folder / f"rng_rank{dist.rank}.pt")
        if fault is not None:
            fault.inject("save", state.global_step, dist.rank)
        if dist.is_main:
            hf_files(folder / "hf")
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        error = f"rank {dist.rank}: cannot write checkpoint {folder}: {_short(exc)}{_full_disk_note(root)}"
    # every rank learns whether any rank failed, so none of them marks a broken checkpoint complete
    errors = gather_errors(error)
    if errors:
        raise BookgenError("; ".join(errors) + ". Earlier checkpoints are untouched.")
    crc32 = _crc32_of_files(folder, dist)
    error = None
    if dist.is_main:
        try:
            write_json_atomic(folder / MARKER, _record(spec, dist, state, folder, crc32, eval_loss) | (
                {"scores": scores} if scores else {}))
            write_text_atomic(root / POINTER, tag + "\n")
            _prune(root, spec.settings.keep, keep_best=spec.settings.keep_best, best_by=spec.settings.best_by)
        except OSError as exc:  # the folder stays unmarked: nothing trusts it, the earlier ones stay
            error = f"cannot mark checkpoint {folder} complete: {_short(exc)}"
    errors = gather_errors(error)  # the other ranks must not wait at a barrier rank 0 never reaches
    if errors:
        raise BookgenError("; ".join(errors) + ". Earlier checkpoints are untouched.")
    return folder


def _record(spec: CheckpointSpec, dist: DistEnv, state: TrainState, folder: Path, crc32: dict[str, str],
            eval_loss: float | None) -> dict[str, Any]:
    """COMPLETE.json: what the checkpoint is, what it was trained with, and each file's size and CRC-32."""
    return {
        "state": asdict(state), "world_size": dist.world_size, "zero_stage": spec.zero_stage,
        "precision": spec.precision, "seed": spec.seed, "global_batch": spec.global_batch,
        "files": _file_sizes(folder), "crc32": crc32,
        "fingerprint": spec.fingerprint, "model": spec.model, "tokenizer": spec.tokenizer,
        "data": {"block_size": spec.block_size, "packing": spec.packing,
                 "group_by_length": spec.group_by_length, "train_sha256": train_split_digest(spec.prepared_dir)},
        "eval_loss": eval_loss,
        MODE_KEY: {"lora": spec.lora, "base_left_out": spec.base_left_out},
    } | ({RECORD_KEY: base_record(str(spec.base))} if spec.base_left_out else {})


def _full_disk_note(folder: Path) -> str:
    """torch's zip writer says "unexpected pos" where the disk filled up: say so when it is nearly full."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (No space left on device: {free:,} bytes free on {folder})" if free < 1 << 20 else ""


def _short(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))[:300]


def _checkpoint_files(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER]


def _crc32_of_files(folder: Path, dist: DistEnv) -> dict[str, str]:
    """Every file's CRC-32, the files striped over the ranks (each hashes about 1/world of the bytes; the
    folder is shared, as saving needs) and gathered: resume, export, eval and generate check them."""
    names = _checkpoint_files(folder)
    mine = {name: crc32_file(folder / name) for i, name in enumerate(names) if i % dist.world_size == dist.rank}
    merged: dict[str, str] = {}
    for part in gather_objects(mine):
        merged |= part  # type: ignore[arg-type]
    return merged


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file's size, recorded in the marker: a truncated file is then found (and named) before loading."""
    return {name: (folder / name).stat().st_size for name in _checkpoint_files(folder)}


REQUIRED_KEYS = ("state", "zero_stage", "fingerprint", "model", "tokenizer")  # what every reader needs


def read_record(folder: Path, *required: str) -> dict[str, Any]:
    """The checkpoint's ``COMPLETE.json``, refused (naming it) when it is not one bookgen wrote."""
    marker = read_json(folder / MARKER)
    keys = (*REQUIRED_KEYS, *required)
    missing = [k for k in keys if k not in marker] if isinstance(marker, dict) else list(keys)
    if missing:
        raise BookgenError(f"{folder / MARKER}: not a bookgen checkpoint record (unreadable, or without "
                           f"{', '.join(missing)}): checkpoint {folder.name} is damaged. {previous_hint(folder)}")
    return marker  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class CheckpointMode:
    """What a checkpoint is: full fine-tuning or LoRA, and whether its pretrained base was left out (then
    ``base`` names it, as the run trained from it)."""

    lora: bool
    base: str | None


def read_mode(folder: Path) -> CheckpointMode:
    """The mode the checkpoint records; one saved before the record is read as it was then: LoRA where its
    hf/ folder holds an adapter config, its base left out where it records one."""
    marker = read_record(folder)
    base = (marker.get(RECORD_KEY) or {}).get("name_or_path")
    mode = marker.get(MODE_KEY)
    if isinstance(mode, dict):
        return CheckpointMode(lora=bool(mode.get("lora")), base=base if mode.get("base_left_out") else None)
    return CheckpointMode(lora=(folder / "hf" / ADAPTER_CONFIG).is_file(), base=base)


def check_files(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Raise, naming the file and the previous complete checkpoint, when a file recorded at save time is
    missing, has another size (a truncated copy, a disk that filled up) or other content (its CRC-32; this
    rank checks every ``world_size``-th file from ``rank``). Checkpoints saved before CRCs were recorded are
    checked by size. Returns the checkpoint's record."""
    marker = read_record(folder, "files")
    crc32 = marker.get("crc32") or {}
    for i, (name, size) in enumerate(sorted(marker["files"].items())):
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes, {size} were saved"
            raise BookgenError(f"{path} {what}: checkpoint {folder.name} is damaged. {previous_hint(folder)}")
        if name in crc32 and i % world_size == rank and crc32_file(path) != crc32[name]:
            raise BookgenError(f"{path} has other content than was saved (CRC-32 differs): checkpoint "
                               f"{folder.name} is damaged. {previous_hint(folder)}")
    return marker


def previous_hint(folder: Path) -> str:
    earlier = [p for p in complete_checkpoints(folder.parent) if p.name < folder.name]
    if not earlier:
        return (f"No earlier complete checkpoint is left: restore the file, or move {folder} out of {folder.parent} "
                "and start again.")
    return (f"Move {folder} out of {folder.parent} and rerun: the run then resumes from the previous complete one, "
            f"{earlier[-1].name} (or resume from it elsewhere with --set checkpoint.resume={earlier[-1]} and another "
            "run.output_dir)")


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step") and (p / MARKER).is_file())


def newest_complete(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def best_complete(root: Path, by: str = "eval_loss") -> Path | None:
    """The complete checkpoint with the lowest recorded validation loss, or the highest recorded score ``by``
    (``rougeL``, ...), the earlier one on a tie."""
    return _best(complete_checkpoints(root), by)


def _best(folders: list[Path], by: str) -> Path | None:
    sign = 1 if by == "eval_loss" else -1  # a loss is best low, a score high
    measured = [(sign * value, p) for p in folders if isinstance(value := _measure(p, by), int | float)]
    return min(measured, key=lambda item: (item[0], item[1].name))[1] if measured else None


def _measure(folder: Path, by: str) -> object:
    record = read_json(folder / MARKER) or {}
    return record.get("eval_loss") if by == "eval_loss" else (record.get("scores") or {}).get(by)


def _prune(root: Path, keep: int, *, keep_best: bool, best_by: str = "eval_loss") -> None:
    done = complete_checkpoints(root)
    best = _best(done, best_by) if keep_best else None
    for old in done[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    if best is not None:
        write_text_atomic(root / BEST_POINTER, best.name + "\n")
    newest = done[-1].name if done else ""
    for partial in root.iterdir():  # interrupted saves older than the newest complete one
        if partial.is_dir() and partial.name.startswith("step") and partial.name < newest and partial not in done:
            shutil.rmtree(partial, ignore_errors=True)


def find_resume(spec: CheckpointSpec) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (or None) and notes to print about what was passed over."""
    mode = spec.settings.resume
    if mode == "never":
        return None, []
    if mode != "auto":
        folder = Path(mode)
        check_resume_folder(folder)
        return folder, []
    root = spec.root
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
    return (done[-1] if done else None), notes


def check_no_other_run(root: Path, start: Path | None) -> None:
    """Refuse a start (fresh: ``start`` None, or from a named checkpoint) whose run folder holds complete
    checkpoints that are not behind it on its own path. Its saves would meet them at the same step and keep
    them (a rerun of a finished run keeps its final checkpoint), and `latest`, `best` and the rotation would
    mix two runs: an export could then hold another run's weights. Nothing is moved or deleted here."""
    done = complete_checkpoints(root)
    if start is not None and start.resolve().parent == root.resolve():
        clash = [p for p in done if p.name > start.name]
        what = f"newer than {start.name}, the checkpoint this run resumes from"
    else:
        clash = done
        what = ("from an earlier run, and this run starts afresh" if start is None
                else f"of another run than {start}, which this run resumes from")
    if clash:
        names = ", ".join(p.name for p in clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise BookgenError(
            f"{root} holds complete checkpoints {what} ({names}): this run's saves would meet them and `latest`, "
            "`best` and the rotation would mix the two runs. Give this run another run.output_dir, or move those "
            "checkpoints out of the folder (bookgen deletes none), or resume the newest with "
            "checkpoint.resume: auto")


def check_resume_folder(folder: Path) -> None:
    """checkpoint.resume names a folder: it must exist and be a complete checkpoint."""
    if not folder.exists():
        raise BookgenError(f"checkpoint.resume: {folder} does not exist (a relative path is read from the "
                           "experiment file's folder)")
    if not (folder / MARKER).is_file():
        raise BookgenError(f"checkpoint.resume: {folder} is not a complete bookgen checkpoint "
                           f"(no {MARKER}; an interrupted save, or not a checkpoint folder?)")


def resolve(root: Path, best_by: str, choice: str | None) -> Path | None:
    """A checkpoint to read from, for eval, export and generate: ``latest`` (or None: the newest complete
    one; None when the run has none), ``best`` (lowest validation loss) or a folder."""
    if choice in (None, "latest"):
        return newest_complete(root)
    if choice == "best":
        best = best_complete(root, best_by)
        if best is None:  # asked for by name: never fall back to another model
            raise BookgenError(f"--checkpoint best: no checkpoint under {root} has a validation loss; train with "
                               "checkpoint.keep_best: true (or pass a folder)")
        return best
    folder = Path(choice)
    if not (folder / MARKER).is_file():
        raise BookgenError(f"--checkpoint: {folder} is not a complete bookgen checkpoint (no {MARKER})")
    return folder


def read_marker(folder: Path, spec: CheckpointSpec) -> dict[str, Any]:
    """The checkpoint's record, refused when the model or tokenizer config differs from this run's."""
    marker = read_record(folder)
    if marker["fingerprint"] != spec.fingerprint:
        diffs = _diff("model", marker["model"], spec.model)
        diffs += _diff("tokenizer", marker["tokenizer"], spec.tokenizer)
        raise BookgenError(f"{folder} was made with another model or tokenizer: " + "; ".join(diffs)
                           + ". Use another run.output_dir or checkpoint.resume: never.")
    return marker


def _diff(section: str, saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [f"{section}.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if k not in RUNTIME_MODEL_KEYS and saved.get(k) != now.get(k)]


