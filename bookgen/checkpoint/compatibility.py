"""What a checkpoint was trained on, checked against the prepared data before it is resumed or evaluated.

The model fingerprint covers the config, not what the config produced: a BPE trained from the config is
retrained when the corpus, the split or the tokenizer settings change, and its token ids then mean other
words. Resuming or evaluating such a checkpoint on the newly prepared tokens runs without an error and
gives nonsense. The same vocabulary over another training split (or another seed) keeps the ids, but a
position saved in the middle of an epoch then points into another order of examples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bookgen.checkpoint.spec import CheckpointSpec
from bookgen.data.prepare import store_dir, tokenizer_dir
from bookgen.data.store import MANIFEST
from bookgen.data.tokenizer import load_tokenizer
from bookgen.errors import BookgenError
from bookgen.fileio import read_json


def vocabulary_digest(tokenizer: Any) -> str:
    """Hash of the token -> id map (added tokens included). Saved tokenizer files differ in formatting
    after a load and save; the map is what gives the ids their meaning."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def saved_vocabulary_digest(folder: Path) -> str:
    return vocabulary_digest(load_tokenizer(folder))


def same_vocabulary_as_prepared(tokenizer: Any, prepared_dir: Path) -> bool:
    return vocabulary_digest(tokenizer) == saved_vocabulary_digest(tokenizer_dir(prepared_dir))


def train_split_digest(prepared_dir: Path) -> str | None:
    """The prepared training split's text checksum (from its token store's manifest); None if unprepared."""
    manifest = read_json(store_dir(prepared_dir, "train") / MANIFEST)
    return manifest.get("source_sha256") if isinstance(manifest, dict) else None


def check_vocabulary(folder: Path, prepared_dir: Path) -> None:
    """Refuse a checkpoint whose tokenizer (saved in it) has another vocabulary than the prepared data's."""
    prepared = tokenizer_dir(prepared_dir)
    if saved_vocabulary_digest(folder / "hf") != saved_vocabulary_digest(prepared):
        raise BookgenError(
            f"{folder} was trained with another vocabulary than {prepared}: the tokenizer was trained anew "
            "since (a BPE is trained on the training split, so the corpus, data.split or tokenizer settings "
            "changed) and the prepared token ids mean other words for this model. Prepare the data it was "
            "trained on again, or start a new run in another run.output_dir")


def check_epoch_order(folder: Path, marker: dict[str, Any], spec: CheckpointSpec) -> list[str]:
    """An epoch's order is a permutation of the training split drawn from (seed, epoch), regrouped by
    length in global batches with data.group_by_length: refuse resuming mid-epoch when any of these
    changed (some summaries would be seen twice, others not at all); at an epoch's end return what
    changed, to say. Markers from before this check record none of them."""
    data = marker.get("data", {})
    changed = []
    grouped, global_batch = data.get("group_by_length"), spec.global_batch
    if grouped not in (None, spec.group_by_length):
        changed.append(f"data.group_by_length ({grouped} then, {spec.group_by_length} now)")
    elif grouped and marker["global_batch"] != global_batch:  # grouping works in whole global batches
        changed.append(f"the global batch under data.group_by_length ({marker['global_batch']} then, "
                       f"{global_batch} now)")
    if data.get("train_sha256") not in (None, train_split_digest(spec.prepared_dir)):
        changed.append(f"the training split ({store_dir(spec.prepared_dir, 'train')}: the corpus or data.split "
                       "changed)")
    if marker.get("seed") not in (None, spec.seed):
        changed.append(f"seed ({marker['seed']} then, {spec.seed} now)")
    if changed and marker["state"]["step_in_epoch"] != 0:
        raise BookgenError(
            f"{folder} was saved in the middle of an epoch, and {' and '.join(changed)} differ from then: the "
            "rest of the epoch would be another order, some summaries seen twice and others not at all. "
            "Resume with the saved values, or change them only at an epoch's end")
    return changed
