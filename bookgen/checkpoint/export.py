"""`bookgen export`: turn a bookgen checkpoint into a Hugging Face folder that `from_pretrained` and `pipeline`
load, without ever deleting what the target folder held (see :func:`check_export_target`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bookgen.checkpoint.consolidate import consolidated_state_dict, load_checkpoint_model
from bookgen.checkpoint.folder import MARKER, read_mode
from bookgen.checkpoint.safetensors_out import model_tensors, write_safetensors
from bookgen.errors import BookgenError
from bookgen.fileio import (
    apply_umask,
    nearest_existing,
    read_json,
    remove_dead_scratch,
    scratch_owner,
    staged_dir,
    write_json_atomic,
)
from bookgen.model.lora import check_adapter_export, is_lora

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


EXPORT_MARKER = "bookgen_export.json"  # what an export wrote; only these files are ever replaced


def _is_run_folder(path: Path) -> bool:
    return (path / "resolved_config.yaml").is_file() or (path / "checkpoints").is_dir()


def _is_checkpoint(path: Path) -> bool:
    return (path / MARKER).is_file() or (path.name.startswith("step") and (path / "hf").is_dir())


def _inside_a_run(out: Path, checkpoint: Path) -> Path | None:
    """The run folder, checkpoint or checkpoint root that ``out`` (resolved) is or lies in, if any: an
    export there would replace a checkpoint's own files (its hf/ config) or mix with the run's records."""
    source = checkpoint.resolve()
    if out.is_relative_to(source):
        return source
    if source.parent.name == "checkpoints" and out.is_relative_to(source.parent.parent):
        return source.parent.parent
    for folder in (out, *out.parents):
        if _is_run_folder(folder) or _is_checkpoint(folder):
            return folder
    return None


def check_export_target(out: Path, *, force: bool, checkpoint: Path) -> None:
    """Refuse a target whose contents an export would overwrite without being asked to: a file, anything in
    a run folder or checkpoint (however the path is spelled, ``--force`` or not), a folder this user cannot
    write, or a non-empty folder that is not a previous export (unless ``force``, which adds the export's
    files; :func:`export` still refuses to replace a file it did not write)."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BookgenError(f"--out: {out} is a file; name a folder (a new one, or a previous export)")
    inside = _inside_a_run(out, checkpoint)
    if inside is not None:
        raise BookgenError(f"--out: {out} is {'' if inside == out else 'inside '}a run folder or checkpoint "
                           f"({inside}); an export never writes there, even with --force: name another folder")
    writable = nearest_existing(out)
    if not os.access(writable, os.W_OK | os.X_OK):
        raise BookgenError(f"--out: cannot write into {writable} (read-only or not yours); name another folder")
    if not out.exists():
        return
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not force:
        raise BookgenError(f"--out: {out} is not empty and holds no previous export; name a new folder, or pass "
                           "--force to add the export's files there (nothing else in it is touched)")


def export(folder: Path, out: Path, *, force: bool = False, max_shard_size: str = "5GB",
           adapter_only: bool = False) -> Path:
    """Write ``folder``'s model and tokenizer as a Hugging Face folder at ``out`` (see
    :func:`check_export_target`). A new folder appears complete or not at all; into an existing one the
    files are moved one by one, the export record last, and files of a previous export that this one does
    not write are removed (nothing else). While files move the record says ``"complete": false`` and lists
    both exports' files, so an export killed half-way leaves a folder the next export still recognises and
    cleans, never one that claims to be complete. ``adapter_only``: a LoRA checkpoint's adapter folder (see
    :func:`bookgen.model.lora.check_adapter_export`) instead of the merged model."""
    out = out.resolve()
    check_export_target(out, force=force, checkpoint=folder)
    shard_bytes = _shard_size(max_shard_size)
    if adapter_only:
        check_adapter_export(folder / "hf")
    source = _source(folder, adapter_only)
    try:
        _export_into(out, source, folder, shard_bytes)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: what was there is untouched
        raise BookgenError(f"--out: cannot write the export into {out}: {exc.strerror or exc}") from exc
    return out


def _shard_size(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError as exc:
        raise BookgenError(f"--max-shard-size: {text!r} is not a size; write it as 5GB, 500MB or 2GiB") from exc
    if size <= 0:
        raise BookgenError(f"--max-shard-size: {text!r} must be more than 0")
    return size


class ModelSource:
    """What an export writes, from a model in memory: a LoRA run's (merged, or the adapter alone)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer

    def write(self, scratch: Path, shard_bytes: int) -> dict[str, object]:
        if is_lora(self.model):  # the adapter alone; the base model it needs is named in adapter_config.json
            self.model.save_pretrained(str(scratch), safe_serialization=True)
            return {"vocab_size": int(self.model.get_input_embeddings().weight.shape[0])}  # the base grows to it
        self.model.save_pretrained(str(scratch), safe_serialization=True, max_shard_size=shard_bytes)
        return {}


class CheckpointSource:
    """What an export writes, straight from a full fine-tuning checkpoint: the consolidated weights shard by shard
    (:mod:`bookgen.checkpoint.safetensors_out`), never a second copy of the model in memory."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.state = consolidated_state_dict(folder, lazy=True)  # first: it checks every file, hf/ included
        self.config = AutoConfig.from_pretrained(str(folder / "hf"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder / "hf"))
        self.state = model_tensors(self.state, self.config, str(folder))

    def write(self, scratch: Path, shard_bytes: int) -> dict[str, object]:
        from transformers import GenerationConfig

        write_safetensors(self.state, scratch, shard_bytes)
        self.config.save_pretrained(str(scratch))
        GenerationConfig.from_model_config(self.config).save_pretrained(str(scratch))
        return {}


def _source(folder: Path, adapter_only: bool) -> ModelSource | CheckpointSource:
    if adapter_only or read_mode(folder).lora:
        return ModelSource(*load_checkpoint_model(folder, merge_adapters=not adapter_only))
    return CheckpointSource(folder)


def _export_into(out: Path, source: ModelSource | CheckpointSource, folder: Path, shard_bytes: int) -> None:
    if not out.exists():
        with staged_dir(out) as scratch:
            _write(source, scratch, folder, shard_bytes)
        return
    previous = read_json(out / EXPORT_MARKER)
    before = set(previous.get("files", [])) if isinstance(previous, dict) else set()
    remove_dead_scratch(out)  # what an export killed outright left
    with tempfile.TemporaryDirectory(dir=out, prefix=f".bookgen-export-{scratch_owner()}-") as tmp:
        scratch = Path(tmp)
        written = _write(source, scratch, folder, shard_bytes)
        theirs = [name for name in written if (out / name).exists() and name not in before | {EXPORT_MARKER}]
        if theirs:  # --force adds files; it never replaces one an export did not write
            raise BookgenError(f"--out: {out} holds {', '.join(theirs)}, which no bookgen export wrote; the export "
                               "would replace them. Move them away or name another folder")
        write_json_atomic(out / EXPORT_MARKER, {"checkpoint": str(folder.resolve()), "complete": False,
                                                "files": sorted((before | set(written)) - {EXPORT_MARKER})})
        for name in written:
            if name != EXPORT_MARKER:
                os.replace(scratch / name, out / name)
        stale = before - set(written)
        for name in stale:
            if "/" not in name and (out / name).is_file():
                (out / name).unlink()
        os.replace(scratch / EXPORT_MARKER, out / EXPORT_MARKER)


def _write(source: ModelSource | CheckpointSource, scratch: Path, checkpoint: Path, shard_bytes: int) -> list[str]:
    record: dict[str, object] = {"checkpoint": str(checkpoint.resolve()), "complete": True}
    record |= source.write(scratch, shard_bytes)
    source.tokenizer.save_pretrained(str(scratch))
    files = sorted(p.name for p in scratch.iterdir() if p.is_file())
    for name in files:
        apply_umask(scratch / name, folder=False)
    write_json_atomic(scratch / EXPORT_MARKER, record | {"files": files})
    return [*files, EXPORT_MARKER]
