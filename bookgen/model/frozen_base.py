"""A LoRA run's frozen base, left out of its checkpoints and rebuilt from where it came from.

A LoRA run on a pretrained model (``model.name_or_path``) trains adapters of a few megabytes over a base of up to
hundreds of gigabytes that never changes: its checkpoints save only what trains (DeepSpeed's
``exclude_frozen_parameters``), and whatever reads one (resume, export, eval, generate) builds the base again
from ``model.name_or_path`` as training built it (grown embeddings, new rows at the mean). The checkpoint
records which weight files the base had (:func:`base_record`: each file's size, a SHA-256 of its safetensors
header, which holds every tensor's name, dtype, shape and offset, and a CRC-32 of its whole content); a base
that no longer matches is refused, naming the file, before anything is loaded.

The CRC-32s cost one read of the base (about 2 GB/s a process: a 16 GB base takes 8 s, a 140 GB one a minute
on one process), so they are remembered with each file's size, inode and times in ``~/.cache/bookgen``
(:class:`~bookgen.data.digests.Digests`): a training run computes them once at its start, striped over its
ranks, and later saves, resumes, exports and evaluations only ``stat`` the files.

A base built from ``model.config`` (random weights) is saved whole: nothing else could rebuild it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bookgen.config import ModelConfig
from bookgen.data.digests import Digests
from bookgen.distributed import DistEnv, gather_objects
from bookgen.errors import BookgenError
from bookgen.fileio import crc32_file
from bookgen.model.embeddings import resize_embeddings
from bookgen.model.partitioned_load import safetensors_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RECORD_KEY = "frozen_base"  # in a checkpoint's COMPLETE.json, only when its base was left out
CONTENTS_MEMO = "base-digests.json"  # in ~/.cache/bookgen: the base files' CRC-32s, by size, inode and times


def leaves_out_base(model: ModelConfig) -> bool:
    """Whether this run's checkpoints leave the frozen base out: LoRA on a pretrained model."""
    return model.lora is not None and model.name_or_path is not None


def keep_out_of_state_dict(model: torch.nn.Module) -> None:
    """Leave the frozen base out of ``model.state_dict()``, which DeepSpeed saves as the module states under ZeRO
    0-2. Its ``exclude_frozen_parameters`` drops each frozen parameter under one name only, so a tied output head
    (GPT-2's, Llama 3.2's) would still be saved whole under its second name; a hook of the model's drops every
    name of every frozen parameter."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop_frozen(_module: torch.nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        for name in frozen:
            state.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop_frozen)


def base_record(name_or_path: str) -> dict[str, Any]:
    """What a checkpoint records of its base: where it comes from and its weight files (None where they cannot be
    found without the network: a hub id not in the local cache)."""
    folder = _local_folder(name_or_path)
    return {"name_or_path": name_or_path, "weights": _weight_files(folder) if folder is not None else None}


def remember_base_contents(name_or_path: str, dist: DistEnv) -> None:
    """Every rank: the CRC-32 of each base file, computed by one rank each (file i on rank i mod world) and
    remembered on every node, so that what follows (saves, the resume check) reads no weight file again."""
    folder = _local_folder(name_or_path)
    files = _base_files(folder) if folder is not None else []
    digests = _contents_memory()
    for path in files[dist.rank :: dist.world_size]:
        digests.of(path)
    for entries in gather_objects(digests.entries(files)):
        digests.adopt(entries)  # type: ignore[arg-type]
    if dist.local_rank == 0:
        _save(digests)


def _contents_memory() -> Digests:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bookgen"
    return Digests(cache / CONTENTS_MEMO, hasher=crc32_file, name="crc32")


def _save(digests: Digests) -> None:
    try:
        digests.save()
    except OSError:  # a read-only home: the next check computes the digests again
        pass


def check_base(record: dict[str, Any], checkpoint: Path) -> bool:
    """Refuse, naming the file, a base whose weight files differ from those the checkpoint was trained on; False
    when there was nothing to compare (a hub id not in the cache, before from_pretrained fetches it)."""
    saved = record.get("weights")
    now = base_record(record["name_or_path"])["weights"]
    if saved is None or now is None:
        return False
    # a record from before content digests has none: what it has is compared
    changed = sorted(name for name in set(saved) & set(now)
                     if any(now[name].get(key) != value for key, value in saved[name].items()))
    missing, new = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    found = [f"{_names(names)} {what}" for names, what in (
        (changed, "other tensors, another size or other values than when the run trained"), (missing, "missing"),
        (new, "new")) if names]
    if found:
        raise BookgenError(
            f"{checkpoint}: this LoRA checkpoint holds only the adapters; its frozen base {record['name_or_path']} "
            f"has changed since it was saved ({'; '.join(found)}). Put the base back there as it was")
    return True


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") + ":"


def load_base(record: dict[str, Any], config: Any, checkpoint: Path) -> PreTrainedModel:
    """The frozen base as the run built it (fp32, CPU): the pretrained weights, the embeddings grown to the
    checkpoint's vocabulary with the new rows at the mean, the checkpoint's model settings (``config``: its
    ``hf/config.json``)."""
    from transformers import AutoModelForCausalLM

    checked = check_base(record, checkpoint)  # before reading any weight
    try:
        model = AutoModelForCausalLM.from_pretrained(record["name_or_path"], dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise BookgenError(f"{checkpoint}: this LoRA checkpoint holds only the adapters, and its frozen base "
                           f"{record['name_or_path']!r} cannot be loaded (put it back where the run trained from "
                           f"it; a symbolic link there to a copy works): {str(exc)[:300]}") from exc
    if not checked:  # a hub id that was not in the cache is now: from_pretrained fetched it
        check_base(record, checkpoint)
    resize_embeddings(model, config.vocab_size, None)
    for key, value in config.to_diff_dict().items():  # special token ids, dropout: what the run set
        if key not in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            setattr(model.config, key, value)
    return model


def _local_folder(name_or_path: str) -> Path | None:
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder
    try:  # a hub id: the snapshot in the local cache, as from_pretrained would use it
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id: nothing to record, from_pretrained will say why
        return None


def _base_files(folder: Path) -> list[Path]:
    """The base's weight files that exist (a shard the index names but the folder lacks is reported missing)."""
    files = safetensors_files(folder) or sorted(folder.glob("pytorch_model*.bin"))
    return [path for path in files if path.is_file()]


def _weight_files(folder: Path) -> dict[str, dict[str, Any]]:
    digests = _contents_memory()
    record = {path.name: {"bytes": path.stat().st_size, "header_sha256": _header_digest(path),
                          "crc32": digests.of(path)} for path in _base_files(folder)}
    _save(digests)
    return record


def _header_digest(path: Path) -> str | None:
    """SHA-256 of a safetensors file's header (a few kilobytes); None for other formats."""
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return None
        (size,) = struct.unpack("<Q", raw)
        return hashlib.sha256(f.read(min(size, 100 << 20))).hexdigest()
