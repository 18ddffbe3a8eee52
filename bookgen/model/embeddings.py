"""The embeddings' rows: grown for the tokens a run adds (new rows at the mean of the old ones), gathered and
written by rank 0 under ZeRO-3, and the special token ids pointed at them. Used by the build, LoRA and the
frozen base's rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from bookgen.deepspeed_import import load_deepspeed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resize_embeddings(model: PreTrainedModel, vocab_size: int, pad_to_multiple_of: int | None) -> None:
    """Grow the (tied) embeddings to hold the new tokens; new rows start at the mean of the old ones. Under
    ZeRO-3 the rows are written by rank 0 on the gathered tensors and partitioned again."""
    old = rows_of(model.get_input_embeddings().weight)
    target = vocabulary_rows(vocab_size, pad_to_multiple_of)
    if target == old:
        return
    model.resize_token_embeddings(target, mean_resizing=False)
    if target <= old:
        return
    weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    weights = [weight] + ([head.weight] if head is not None and head.weight is not weight else [])
    with _gathered(weights) as writer:
        if writer:
            with torch.no_grad():
                for w in weights:  # summed in float64, as the partitioned load sums its ranks' parts: the same rows
                    w[old:] = w[:old].double().mean(dim=0, keepdim=True).to(w.dtype)


def vocabulary_rows(vocab_size: int, pad_to_multiple_of: int | None) -> int:
    """Embedding rows for a vocabulary: its size, rounded up to ``pad_to_multiple_of``."""
    if not pad_to_multiple_of:
        return vocab_size
    return -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of


def rows_of(weight: torch.Tensor) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])


@contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[bool]:
    """Full tensors to write: as they are, or ZeRO-3 partitions gathered, written by rank 0 (yields whether
    this rank writes) and partitioned again on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield True
        return
    deepspeed = load_deepspeed()

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield torch.distributed.get_rank() == 0


def set_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Point the model and generation configs at <BOS>/<EOS>/<PAD>, so generation stops at <EOS>."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
