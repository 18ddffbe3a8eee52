"""Examples, their order, each rank's share, and padded batches: pure functions over the token store.

An *example* is either one document truncated to the block size (line by line, as the reference) or
one block of the concatenated documents (``data.packing``). The order of an epoch depends only on the
seed and the epoch, so a resumed run can skip straight to its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bookgen.data.store import TokenStore

IGNORE_INDEX = -100  # positions the loss skips (padding)
GROUP_CHUNK_BATCHES = 50  # length grouping sorts within this many global batches, keeping some randomness


@dataclass(slots=True)
class Examples:
    """Index over a token store: example i is ``tokens_of(i)``; ``lengths[i]`` its token count."""

    store: TokenStore
    block_size: int
    packed: bool
    lengths: np.ndarray
    _doc_starts: np.ndarray  # packed only: global token offset of each document

    @classmethod
    def build(cls, store: TokenStore, block_size: int, packed: bool) -> Examples:
        if not packed:
            lengths = np.minimum(store.lengths, block_size).astype(np.int64)
            return cls(store, block_size, False, lengths, np.zeros(0, np.int64))
        starts = np.concatenate([[0], np.cumsum(store.lengths)]).astype(np.int64)
        n_blocks = int(starts[-1]) // block_size  # the incomplete tail block is dropped
        return cls(store, block_size, True, np.full(n_blocks, block_size, np.int64), starts)

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens_of(self, index: int) -> np.ndarray:
        if not self.packed:
            return self.store[index][: self.block_size]
        lo, hi = index * self.block_size, (index + 1) * self.block_size
        first = int(np.searchsorted(self._doc_starts, lo, side="right")) - 1
        pieces, doc = [], first
        while lo < hi:
            start = int(self._doc_starts[doc])
            doc_tokens = self.store[doc]
            take = doc_tokens[lo - start : hi - start]
            pieces.append(take)
            lo += len(take)
            doc += 1
        return np.concatenate(pieces)


def epoch_order(
    lengths: np.ndarray, *, seed: int, epoch: int, global_batch: int, group_by_length: bool
) -> np.ndarray:
    """Example indices for one epoch, truncated to whole global batches (every rank gets equal work)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = len(order) // global_batch * global_batch
    if group_by_length and usable:
        chunk = global_batch * GROUP_CHUNK_BATCHES
        sorted_chunks = [
            part[np.argsort(-lengths[part], kind="stable")] for part in np.split(order, range(chunk, len(order), chunk))
        ]
        order = np.concatenate(sorted_chunks)[:usable]
        batches = order.reshape(-1, global_batch)
        return batches[rng.permutation(len(batches))].reshape(-1)
    return order[:usable]


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return n_examples // global_batch


def micro_batch_indices(
    order: np.ndarray, *, step: int, micro: int, rank: int, world_size: int, micro_batch_size: int, accum: int
) -> np.ndarray:
    """The examples that ``rank`` uses in micro-batch ``micro`` of optimizer step ``step``."""
    global_batch = micro_batch_size * world_size * accum
    start = step * global_batch + (micro * world_size + rank) * micro_batch_size
    return order[start : start + micro_batch_size]


def predicted_tokens(lengths: np.ndarray, order: np.ndarray, *, step: int, global_batch: int) -> int:
    """Tokens the loss predicts in optimizer step ``step`` over all ranks (each example: its length - 1).

    Every rank computes it from the shared order, so token-weighting the loss needs no collective."""
    picked = lengths[order[step * global_batch : (step + 1) * global_batch]]
    return int(np.maximum(picked - 1, 0).sum())


def eval_shard(lengths: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Each example exactly once over all ranks, no padding by repetition (unlike DistributedSampler),
    longest first: batches of similar lengths spend little on padding (the token-weighted result does not
    depend on the order), and a batch too large for memory fails at once, not at the end."""
    shard = np.arange(rank, len(lengths), world_size)
    return shard[np.argsort(-lengths[shard], kind="stable")]


def collate(token_lists: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE_INDEX."""
    width = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        input_ids[row, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
        attention[row, : len(tokens)] = 1
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch tensor to ``device``; on a GPU through pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch as model arguments on ``device``. Without padding (packed blocks) the attention mask is
    left out: attention is then plainly causal, which picks the flash kernels on GPUs. transformers can
    drop an all-ones mask itself, but not under torch.compile (it cannot read the mask's values while
    tracing), where it would build a dense mask instead."""
    full = bool(batch["attention_mask"].all())
    return {k: to_device(v, device) for k, v in batch.items() if not (full and k == "attention_mask")}
