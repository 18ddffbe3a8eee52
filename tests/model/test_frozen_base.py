"""What a LoRA checkpoint records of the frozen base it leaves out, and the refusal of a base that changed since."""

from __future__ import annotations

import pytest
import torch

from bookgen.errors import BookgenError
from bookgen.model.frozen_base import base_record, check_base


def _save(folder, layers: int, shard: str | None = None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=layers, n_head=2, n_embd=16, n_positions=32))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))


def test_a_base_with_other_tensors_or_files_is_refused_naming_the_file(tmp_path):
    base = tmp_path / "base"
    _save(base, 1)
    record = base_record(str(base))
    assert list(record["weights"]) == ["model.safetensors"]
    check_base(record, tmp_path / "step8")  # unchanged: nothing to say

    _save(base, 2)  # another model written over it: other tensors in the header
    with pytest.raises(BookgenError, match=r"step8: .*frozen base .*base has changed since it was saved "
                                           r"\(model.safetensors: other tensors"):
        check_base(record, tmp_path / "step8")

    for old in base.glob("*.safetensors"):
        old.unlink()
    _save(base, 1, shard="5KB")  # the same weights, sharded: other files
    with pytest.raises(BookgenError, match=r"model.safetensors: missing; model-00001-of-0000\d.safetensors, .*: new"):
        check_base(record, tmp_path / "step8")

    sharded = base_record(str(base))
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.unlink()  # the index still names it
    with pytest.raises(BookgenError, match=rf"{shard.name}: missing"):
        check_base(sharded, tmp_path / "step8")


def test_a_hub_id_outside_the_local_cache_records_no_files_and_is_not_checked(tmp_path):
    record = base_record("bookgen-test/not-in-any-cache")
    assert record == {"name_or_path": "bookgen-test/not-in-any-cache", "weights": None}
    check_base(record, tmp_path / "step8")


def test_other_values_of_the_same_shapes_are_refused_and_digests_are_remembered(tmp_path, monkeypatch):
    """Random tensors of the same shapes written over the base let eval, generate and resume run on (the
    record held sizes and header hashes only). The content's CRC-32 is remembered by size, inode and times:
    a second look reads no weight file."""
    import os
    import time

    from safetensors.torch import load_file, save_file

    from bookgen.model import frozen_base

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    base = tmp_path / "base"
    _save(base, 1)
    weights = base / "model.safetensors"
    past = time.time() - 60  # a file hashed within seconds of its last change is hashed again (racily clean)
    os.utime(weights, (past, past))
    record = base_record(str(base))
    assert (tmp_path / "cache" / "bookgen" / "base-digests.json").is_file()
    with monkeypatch.context() as patched:
        read = []
        patched.setattr(frozen_base, "crc32_file", lambda path: read.append(path) or "00000000")
        check_base(record, tmp_path / "step8")
        assert read == [], "remembered: no weight file read again"

    tensors = {k: torch.randn_like(v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(BookgenError, match=r"\(model.safetensors: other tensors, another size or other values"):
        check_base(record, tmp_path / "step8")
