"""Examples, their order, each rank's share, and batches: pure functions over the token store.

An *example* is one row of a micro-batch, by ``data.packing``:

- ``none``: one document truncated to the block size (line by line, as the reference);
- ``documents``: whole documents, each truncated as line by line truncates it, packed into rows of at most
  the block size (best-fit decreasing, see :func:`pack_documents`). Position ids restart at 0 at each
  document, which makes transformers build a block-diagonal causal mask (no attention across documents),
  and a document's first token is no target: every document's loss and gradient are those it gets alone;
- ``concat``: one block of the concatenated documents (continued pre-training; not comparable).

A store of prompt-completion rows records each document's prompt length (<BOS> and the rendered prompt):
those tokens are never targets, in any packing mode, so the loss is the completion's alone (and <EOS>).

The order of an epoch depends only on the seed and the epoch, so a resumed run can skip straight to its
position.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from bookgen.data.batch_layout import BatchLayout
from bookgen.data.store import TokenStore

BOUNDS_BUCKET = 64  # cu_seq_lens_q comes in lengths that are multiples of this
IGNORE_INDEX = -100  # positions the loss skips (padding, a document's first token when packed)
GROUP_CHUNK_BATCHES = 50  # length grouping sorts within this many global batches, keeping some randomness
Packing = Literal["none", "documents", "concat"]
Batch = dict[str, "torch.Tensor | int"]  # host tensors, and the packed rows' longest length


def pack_documents(lengths: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Best-fit decreasing: documents longest first (ties by index), each into the row with the least room
    that still holds it, else a new row. Deterministic, little padding (rows are nearly full once short
    documents fill the gaps), and no document is split. ``lengths`` must be <= ``block_size``."""
    import bisect

    order = np.lexsort((np.arange(len(lengths)), -lengths))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for doc in order:
        need = int(lengths[doc])
        at = bisect.bisect_left(room, (need, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = block_size, len(rows)
            rows.append([])
        rows[row].append(int(doc))
        if free - need > 0:
            bisect.insort(room, (free - need, row))
    return [np.asarray(r, dtype=np.int64) for r in rows]


class Examples:
    """Index over a token store, one class per ``data.packing``: example i is ``tokens_of(i)``, made of the
    documents whose lengths ``segments_of(i)`` gives; ``lengths[i]`` is its token count and ``targets[i]`` the
    tokens its loss predicts. :meth:`build` picks the class. ``compiled``: they feed a compiled model, which
    compiles again for every new shape: packed rows are as wide as the block, every evaluation batch is full
    (:func:`bookgen.evaluation.perplexity.perplexity`), and rows of varying width say so
    (:attr:`dynamic_width`), so that it compiles once for any width instead of once for the first."""

    lengths: np.ndarray
    targets: np.ndarray

    def __init__(self, store: TokenStore, block_size: int, *, compiled: bool = False) -> None:
        self.store, self.block_size, self.compiled = store, block_size, compiled
        self.doc_lengths = np.minimum(store.lengths, block_size).astype(np.int64)  # each truncated alone
        # each document's first target: after <BOS> and its prompt (a truncated document may have none)
        self.doc_first = np.minimum(np.maximum(store.prompt_lengths, 1), self.doc_lengths).astype(np.int64)
        self.doc_targets = self.doc_lengths - self.doc_first

    @staticmethod
    def build(store: TokenStore, block_size: int, packing: Packing, *, compiled: bool = False) -> Examples:
        kinds: dict[str, type[Examples]] = {"none": LineByLine, "documents": PackedDocuments, "concat": ConcatBlocks}
        return kinds[packing](store, block_size, compiled=compiled)

    def __len__(self) -> int:
        return len(self.lengths)

    def segments_of(self, index: int) -> list[int]:
        return [int(self.lengths[index])]

    def tokens_of(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def width(self, lengths: np.ndarray) -> int:
        """How wide a micro-batch of examples of these lengths is: its longest row."""
        return int(lengths.max())

    @property
    def dynamic_width(self) -> bool:
        """A compiled model meets rows of many widths."""
        return False

    def batch(self, indices: list[int] | np.ndarray, pad_id: int) -> Batch:
        """The host tensors for these examples: right-padded rows."""
        return collate([self.tokens_of(int(i)) for i in indices], pad_id,
                       [self.not_targets(int(i)) for i in indices])

    def not_targets(self, index: int) -> np.ndarray | None:
        """Positions of example ``index`` that are no target although they are tokens (prompts); None: all are."""
        return None


class LineByLine(Examples):
    """``none``: one document a row, truncated to the block size (the reference's recipe)."""

    def __init__(self, store: TokenStore, block_size: int, *, compiled: bool = False) -> None:
        super().__init__(store, block_size, compiled=compiled)
        self.lengths, self.targets = self.doc_lengths, self.doc_targets

    @property
    def dynamic_width(self) -> bool:
        return self.compiled

    def not_targets(self, index: int) -> np.ndarray | None:
        first = int(self.doc_first[index])
        return np.arange(first) if first > 1 else None

    def tokens_of(self, index: int) -> np.ndarray:
        return self.store[index][: self.block_size]


class PackedDocuments(Examples):
    """``documents``: whole documents packed into rows (:func:`pack_documents`), positions restarting at each
    and its first token no target, so each document's loss is the one it gets alone."""

    def __init__(self, store: TokenStore, block_size: int, *, compiled: bool = False) -> None:
        super().__init__(store, block_size, compiled=compiled)
        self.rows = pack_documents(self.doc_lengths, block_size)  # each row's document indices
        self.lengths = np.array([self.doc_lengths[r].sum() for r in self.rows], np.int64)
        self.targets = np.array([self.doc_targets[r].sum() for r in self.rows], np.int64)

    def segments_of(self, index: int) -> list[int]:
        return self.doc_lengths[self.rows[index]].tolist()

    def width(self, lengths: np.ndarray) -> int:
        """For a compiled model the block size, whatever the rows (nearly full anyway): a row 3 tokens short
        would compile it again."""
        return self.block_size if self.compiled else int(lengths.max())

    def tokens_of(self, index: int) -> np.ndarray:
        return np.concatenate([self.store[int(d)][: self.block_size] for d in self.rows[index]])

    def batch(self, indices: list[int] | np.ndarray, pad_id: int) -> Batch:
        """Packed rows with positions restarting at every document."""
        return collate_documents([self.tokens_of(int(i)) for i in indices],
                                 [self.segments_of(int(i)) for i in indices], pad_id,
                                 [self.doc_first[self.rows[int(i)]].tolist() for i in indices],
                                 width=self.width(self.lengths[np.asarray(indices, dtype=np.int64)]))


class ConcatBlocks(Examples):
    """``concat``: full blocks of the concatenated documents, crossing them; the tail block is dropped."""

    def __init__(self, store: TokenStore, block_size: int, *, compiled: bool = False) -> None:
        super().__init__(store, block_size, compiled=compiled)
        self.doc_starts = np.concatenate([[0], np.cumsum(store.lengths)]).astype(np.int64)
        self.lengths = np.full(int(self.doc_starts[-1]) // block_size, block_size, np.int64)
        self.prompts = np.minimum(store.prompt_lengths, store.lengths).astype(np.int64)
        # a block's first token is no target; nor is any prompt token after it
        lo = np.arange(len(self.lengths), dtype=np.int64) * block_size
        self.targets = self.lengths - 1 - (self._prompt_tokens_before(lo + block_size)
                                           - self._prompt_tokens_before(lo + 1))

    def _prompt_tokens_before(self, positions: np.ndarray) -> np.ndarray:
        """Prompt tokens in the concatenated stream before each position."""
        if not self.prompts.any():
            return np.zeros(len(positions), np.int64)
        starts = self.doc_starts[:-1]
        doc = np.searchsorted(starts, positions, side="right") - 1
        before = np.concatenate([[0], np.cumsum(self.prompts)])[doc]
        return before + np.minimum(positions - starts[doc], self.prompts[doc])

    def not_targets(self, index: int) -> np.ndarray | None:
        if not self.prompts.any():
            return None
        lo, hi = index * self.block_size, (index + 1) * self.block_size
        first, last = (int(np.searchsorted(self.doc_starts[:-1], x, side="right")) - 1 for x in (lo, hi - 1))
        spans = [np.arange(max(self.doc_starts[d], lo), min(self.doc_starts[d] + self.prompts[d], hi)) - lo
                 for d in range(first, last + 1)]
        return np.concatenate(spans)

    def tokens_of(self, index: int) -> np.ndarray:
        lo, hi = index * self.block_size, (index + 1) * self.block_size
        doc = int(np.searchsorted(self.doc_starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            take = self.store[doc][lo - int(self.doc_starts[doc]) : hi - int(self.doc_starts[doc])]
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


def micro_batch_indices(order: np.ndarray, *, step: int, micro: int, rank: int, layout: BatchLayout) -> np.ndarray:
    """The examples that ``rank`` uses in micro-batch ``micro`` of optimizer step ``step``."""
    start = step * layout.global_batch + (micro * layout.world_size + rank) * layout.micro_batch_size
    return order[start : start + layout.micro_batch_size]


def predicted_tokens(targets: np.ndarray, order: np.ndarray, *, step: int, global_batch: int) -> int:
    """Tokens the loss predicts in optimizer step ``step`` over all ranks (``Examples.targets``: a document's
    length - 1, whether alone or packed).

    Every rank computes it from the shared order, so token-weighting the loss needs no collective."""
    return int(targets[order[step * global_batch : (step + 1) * global_batch]].sum())


def eval_shard(lengths: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Each example exactly once over all ranks, no padding by repetition (unlike DistributedSampler),
    longest first: batches of similar lengths spend little on padding (the token-weighted result does not
    depend on the order), and a batch too large for memory fails at once, not at the end."""
    shard = np.arange(rank, len(lengths), world_size)
    return shard[np.argsort(-lengths[shard], kind="stable")]


def collate(token_lists: list[np.ndarray], pad_id: int, not_targets: list[np.ndarray | None] | None = None
            ) -> Batch:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE_INDEX, and so do the
    positions ``not_targets`` names in each row (prompts)."""
    width = max(len(t) for t in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        input_ids[row, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
        attention[row, : len(tokens)] = 1
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    for row, positions in enumerate(not_targets or []):
        if positions is not None and len(positions):
            labels[row, torch.from_numpy(positions)] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_documents(token_rows: list[np.ndarray], segments: list[list[int]], pad_id: int,
                      firsts: list[list[int]] | None = None, *, width: int | None = None) -> Batch:
    """Packed rows: position ids restart at 0 at every document (and at the padding that fills a short row, its
    own segment), and each document's first token is not a target, nor are its first ``firsts`` tokens (<BOS>
    and a prompt). ``cu_seq_lens_q`` holds every segment's
    start over the flattened batch (padded with empty segments to a multiple of :data:`BOUNDS_BUCKET` entries, so
    a compiled model sees few shapes), ``max_length_q`` the rows' width: bookgen's attention attends within
    each segment (:mod:`bookgen.model.attention`). transformers' own attentions get the position ids alone and
    find the segments from them. ``width``: the rows' (:meth:`Examples.width`); default the longest row's."""
    width = width or max(len(t) for t in token_rows)
    input_ids = torch.full((len(token_rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(token_rows), width), dtype=torch.long)
    labels = torch.full((len(token_rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(token_rows), width), dtype=torch.long)
    bounds = [0]
    for row, (tokens, lengths) in enumerate(zip(token_rows, segments, strict=True)):
        skips = iter(firsts[row] if firsts is not None else [])
        ids = torch.from_numpy(tokens.astype(np.int64))
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        start = 0
        for n in [*lengths, width - len(ids)]:
            if n == 0:
                continue
            positions[row, start : start + n] = torch.arange(n)
            if start < len(ids):  # the previous document does not predict this one; nor is a prompt a target
                labels[row, start : start + max(next(skips, 1), 1)] = IGNORE_INDEX
            start += n
            bounds.append(row * width + start)
    bounds += [bounds[-1]] * (-len(bounds) % BOUNDS_BUCKET)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "attention_mask": attention,
            "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32), "max_length_q": width}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch tensor to ``device``; on a GPU through pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


PACKING_KEYS = ("cu_seq_lens_q", "max_length_q")  # what only bookgen's attention reads


def model_inputs(batch: Batch, device: torch.device, *, bookgen_attention: bool, dynamic_width: bool = False
                 ) -> dict[str, torch.Tensor | int]:
    """A host batch as model arguments on ``device``.

    For bookgen's attention (:mod:`bookgen.model.attention`) everything goes: transformers builds no mask from
    the attention mask (passed only so it does not read the ids back looking for padding), and the summary
    boundaries reach the attention. For transformers' own attentions, packed rows go without a mask (the
    position ids mark the summaries) and a batch without padding too (plainly causal: the flash kernel, also
    under torch.compile, where transformers could not drop an all-ones mask itself). ``dynamic_width``: the
    rows' width varies from batch to batch (:attr:`Examples.dynamic_width`)."""
    keep = dict(batch)
    if not bookgen_attention:
        for key in PACKING_KEYS:
            keep.pop(key, None)
        mask = keep.get("attention_mask")
        if "position_ids" in keep or (isinstance(mask, torch.Tensor) and mask.numpy().all()):
            keep.pop("attention_mask", None)
    moved = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in keep.items()}
    if dynamic_width:  # compiled for any width at once (dynamo would compile for the first, then again)
        for value in moved.values():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                torch._dynamo.maybe_mark_dynamic(value, 1)
    return moved


def step_token_counts(examples: Examples, order: np.ndarray, *, step: int, layout: BatchLayout) -> tuple[int, int]:
    """(non-padding tokens, tokens fed to the model with padding) of optimizer step ``step`` over all ranks,
    from the shared order on the host: every rank knows them without a collective or a device read. A
    micro-batch is as wide as :meth:`Examples.width` says."""
    tokens = inputs = 0
    for micro in range(layout.grad_accum_steps):
        for rank in range(layout.world_size):
            lengths = examples.lengths[micro_batch_indices(order, step=step, micro=micro, rank=rank, layout=layout)]
            tokens += int(lengths.sum())
            inputs += len(lengths) * examples.width(lengths)
    return tokens, inputs
