"""`bookgen export`: turn a bookgen checkpoint into a Hugging Face folder that `from_pretrained` and `pipeline`
load, without ever deleting what the target folder held (see :func:`check_export_target`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bookgen.checkpoint_model import load_checkpoint_model
from bookgen.errors import BookgenError
from bookgen.fileio import apply_umask, read_json, remove_dead_scratch, scratch_owner, staged_dir, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


EXPORT_MARKER = "bookgen_export.json"  # what an export wrote; only these files are ever replaced


def _is_run_folder(path: Path) -> bool:
    return (path / "resolved_config.yaml").is_file() or (path / "checkpoints").is_dir()


def check_export_target(out: Path, *, force: bool, checkpoint: Path) -> None:
    """Refuse a target whose contents an export would overwrite without being asked to: a file, a run
    folder (or one holding the checkpoint), or a non-empty folder that is not a previous export (unless
    ``force``, which adds the export's files and still deletes nothing else)."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise BookgenError(f"--out: {out} is a file; name a folder (a new one, or a previous export)")
    if not out.exists():
        return
    if _is_run_folder(out) or checkpoint.resolve().is_relative_to(out):
        raise BookgenError(f"--out: {out} is a run folder (or holds {checkpoint}); an export never writes there, "
                           "even with --force: name another folder")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file() and not force:
        raise BookgenError(f"--out: {out} is not empty and holds no previous export; name a new folder, or pass "
                           "--force to add the export's files there (nothing else in it is touched)")


def export(folder: Path, out: Path, *, force: bool = False) -> Path:
    """Write ``folder``'s model and tokenizer as a Hugging Face folder at ``out`` (see
    :func:`check_export_target`). A new folder appears complete or not at all; into an existing one the
    files are moved one by one, the export record last, and files of a previous export that this one does
    not write are removed (nothing else). While files move the record says ``"complete": false`` and lists
    both exports' files, so an export killed half-way leaves a folder the next export still recognises and
    cleans, never one that claims to be complete."""
    out = out.resolve()
    check_export_target(out, force=force, checkpoint=folder)
    model, tokenizer = load_checkpoint_model(folder)
    if not out.exists():
        with staged_dir(out) as scratch:
            _write(model, tokenizer, scratch, folder)
        return out
    previous = read_json(out / EXPORT_MARKER)
    before = set(previous.get("files", [])) if isinstance(previous, dict) else set()
    remove_dead_scratch(out)  # what an export killed outright left
    with tempfile.TemporaryDirectory(dir=out, prefix=f".bookgen-export-{scratch_owner()}-") as tmp:
        scratch = Path(tmp)
        written = _write(model, tokenizer, scratch, folder)
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
    return out


def _write(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, scratch: Path, source: Path) -> list[str]:
    model.save_pretrained(str(scratch), safe_serialization=True)
    tokenizer.save_pretrained(str(scratch))
    files = sorted(p.name for p in scratch.iterdir() if p.is_file())
    for name in files:
        apply_umask(scratch / name, folder=False)
    write_json_atomic(scratch / EXPORT_MARKER, {"checkpoint": str(source.resolve()), "complete": True,
                                                "files": files})
    return [*files, EXPORT_MARKER]
