"""Token-weighted perplexity over all ranks: exp(total NLL / total predicted tokens).

Every example is counted exactly once whatever the world size. Ranks with fewer batches still run
forward passes on a dummy batch with weight zero, because under ZeRO-3 every forward gathers
parameters collectively and all ranks must take part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bookgen.data.batches import IGNORE_INDEX, Examples, eval_shard, model_inputs
from bookgen.distributed import DistEnv, all_reduce_max, all_reduce_sum
from bookgen.model.attention import uses_causal_attention

Forward = Callable[..., object]  # model or engine: forward(input_ids=..., [attention_mask=...]) -> .logits


@dataclass(frozen=True, slots=True)
class EvalResult:
    split: str
    loss: float
    perplexity: float
    tokens: int
    examples: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def batch_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64, on the logits' device). logits: (batch, seq, vocab)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll.double()


def predicted_count(labels: torch.Tensor) -> int:
    """Tokens that have a next-token target (counted on the host copy of the labels)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def perplexity(
    forward: Forward, examples: Examples, *, split: str, dist: DistEnv, batch_size: int, pad_id: int,
    device: torch.device, on_batch: Callable[[], None] | None = None,
) -> EvalResult:
    shard = eval_shard(examples.lengths, dist.rank, dist.world_size)
    n_batches = all_reduce_max(-(-len(shard) // batch_size), device)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    causal = uses_causal_attention(forward)
    for b in range(n_batches):
        picked = shard[b * batch_size : (b + 1) * batch_size]
        real = len(picked) > 0
        rows = picked if real else shard[-1:] if len(shard) else np.zeros(1, np.int64)  # for ZeRO-3's gathers
        if examples.compiled:
            # a compiled model: every batch has batch_size rows, the last one's filled with copies of its own
            # rows (no wider) that are no targets; a batch of 1 row, or any other size, would compile it again
            rows = np.resize(rows, batch_size)
        host = examples.batch(rows, pad_id)
        host["labels"][len(picked):] = IGNORE_INDEX
        batch = model_inputs(host, device, bookgen_attention=causal)
        labels = batch.pop("labels")
        out = forward(**batch, use_cache=False)  # a KV cache would keep every layer's keys and values alive
        if real:
            total_nll += batch_nll(out.logits, labels)  # type: ignore[attr-defined]
            total_tokens += predicted_count(host["labels"])
        if on_batch is not None:
            on_batch()
    nll_sum, tokens, n_examples = all_reduce_sum([total_nll, float(total_tokens), float(len(shard))], device)
    loss = nll_sum / max(tokens, 1.0)
    return EvalResult(split=split, loss=loss, perplexity=math.exp(loss), tokens=int(tokens), examples=int(n_examples))
