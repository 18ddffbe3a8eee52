"""Attention for training on CPU, registered with transformers.

With ``dropout_p > 0`` PyTorch's CPU SDPA leaves its flash kernel for the math path, and with a mask
(packed rows, padding) it computes the whole masked T x T square: at block 512 that takes about half of
a GPT-2 training step on this CPU. Here queries go in blocks, each against only the keys its queries may
see: the causal upper half is never computed, nor, in packed rows, another summary's keys, nor a padded
row's padding. A hand-written backward writes the gradients of each block into whole-tensor buffers, where
autograd would allocate a zero tensor of the full size per slice. Queries, keys and values are read where
transformers leaves them (strided views of the QKV projection) and the output and gradients are written in
the (B, T, H, D) layout of the projections around attention, so no layout copy is made either way. The
maths is the eager one (softmax, dropout on the probabilities, times V), so results match up to rounding.
Training only: evaluation and generation (and any call this path does not fit) go to transformers' own SDPA
function unchanged. :func:`bookgen.cpu.speed_up_training` installs it, on a CPU and uncompiled only (its
host-side block list would break a compiled graph).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from bookgen.cpu.dropout import apply_keep, keep_scale

NAME = "bookgen_sdpa"
QUERY_BLOCK = 128  # measured: 64-128 equally fast at block 512, 256 slower


@dataclass(frozen=True, slots=True)
class Block:
    """Queries ``q_start:q_end`` of every head of the batch rows ``rows`` against keys ``k_start:k_end``;
    ``row`` is the mask's batch row, None where there is no mask (causal only).

    Every query may see the block's keys before ``k_start + mask_from``; ``bias`` (0 where allowed, -inf where
    masked) covers the rest, in a causal block the diagonal square only, so a block adds a small tile where it
    would otherwise mask its whole score matrix. A block with ``empty_queries`` (some query may attend to
    nothing, and gets constant weights) is masked whole instead, as -inf everywhere would give NaN."""

    rows: slice
    row: int | None
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    empty_queries: bool = False
    mask_from: int = 0
    bias: torch.Tensor | None = field(default=None, compare=False, repr=False)


# the blocks of the last mask seen: transformers builds one mask per forward and hands the same tensor to
# every layer, so the blocks are worked out once per forward (the weak reference never keeps a mask alive)
_last: dict[str, object] = {}


def query_blocks(mask: torch.Tensor | None, batch: int, heads: int, t: int, block: int = QUERY_BLOCK) -> list[Block]:
    """The blocks that cover every query once. With a mask, queries go in runs that share their first
    allowed key (a summary, or a row's padding), at most ``block`` long, and each block's keys span from the
    first key any of its queries may see to the last; keys outside that span are masked for all of them."""
    if mask is None:
        everything = slice(0, batch)
        return [Block(everything, None, s, e, 0, e, mask_from=s, bias=_causal_tile(e - s))
                for s, e in ((s, min(s + block, t)) for s in range(0, t, block))]
    ref = _last.get("mask")
    if ref is not None and ref() is mask and _last["key"] == (batch, heads, block):
        return _last["blocks"]  # type: ignore[return-value]
    allowed = mask[:, 0]
    keys = torch.arange(allowed.shape[-1], device=mask.device)
    first = torch.where(allowed, keys, allowed.shape[-1]).amin(-1).cpu().numpy()
    last = torch.where(allowed, keys, -1).amax(-1).cpu().numpy()
    blocks = []
    shared = allowed.shape[0] == 1  # one mask row for the whole batch: its blocks cover every row
    for row in range(allowed.shape[0]):
        rows = slice(0, batch) if shared else slice(row, row + 1)
        starts = np.flatnonzero(np.diff(first[row], prepend=-1)).tolist()
        for s, e in zip(starts, [*starts[1:], t], strict=True):
            for qs in range(s, e, block):
                qe = min(qs + block, e)
                ks, ke = int(first[row, qs:qe].min()), int(last[row, qs:qe].max()) + 1
                empty = bool((first[row, qs:qe] > last[row, qs:qe]).any())
                if ks >= ke:  # its queries may attend to nothing: uniform weights over the causal keys
                    ks, ke = 0, qe
                blocks.append(_with_bias(Block(rows, row, qs, qe, ks, ke, empty), allowed[row]))
    _last.update(mask=weakref.ref(mask), key=(batch, heads, block), blocks=blocks)
    return blocks


@lru_cache(maxsize=8)
def _causal_tile(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu_(1)


def _with_bias(b: Block, allowed: torch.Tensor) -> Block:
    """``b`` with its ``mask_from`` and ``bias`` taken from ``allowed`` (queries x keys, True = may attend)."""
    if b.empty_queries:
        return b
    seen = allowed[b.q_start : b.q_end, b.k_start : b.k_end]
    by_all = seen.all(0)  # the keys every query of the block may see
    start = int(by_all.logical_not().int().argmax()) if not bool(by_all.all()) else seen.shape[1]
    bias = torch.zeros(seen.shape[0], seen.shape[1] - start).masked_fill_(~seen[:, start:], float("-inf"))
    return replace(b, mask_from=start, bias=bias)


def _allowed(mask: torch.Tensor | None, b: Block, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(b.q_end - b.q_start, b.k_end, dtype=torch.bool, device=device).tril(b.q_start)
    return mask[b.row, 0, b.q_start : b.q_end, b.k_start : b.k_end]


def dropout_probabilities(probs: torch.Tensor, p: float) -> torch.Tensor:
    """``probs`` with each element dropped at rate p and the rest scaled by 1 / (1 - p), with bookgen's NumPy
    masks (:mod:`bookgen.cpu.dropout`), in cache-sized chunks for float32."""
    if probs.dtype == torch.float32 and probs.is_contiguous():
        return apply_keep(probs, p, save_mask=False)[0]
    return probs * keep_scale(probs.shape, p).to(probs.dtype)


class _BlockedAttention(torch.autograd.Function):
    """(B, H, T, D) query, key and value of any strides; returns (B, H, T, D) as a view of a (B, T, H, D)
    tensor. Saves each block's probabilities and, with dropout, the kept ones.

    The backward takes the softmax through the FlashAttention identity, rowsum(P * dP) = rowsum(dOut * Out).
    The dropout scale rides on the kept probabilities (the dropout makes them scaled) and the score scale
    on the small (queries x D) products, so no score block takes an extra pass for either."""

    @staticmethod
    def forward(ctx, q, k, v, mask, blocks, scaling, dropout):  # type: ignore[no-untyped-def]
        lowest = torch.finfo(q.dtype).min
        q = q * scaling  # once per layer, not once per score block
        batch, heads, t, d = q.shape
        out = torch.empty(batch, t, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        saved = []
        for b in blocks:
            qs, ks = slice(b.q_start, b.q_end), slice(b.k_start, b.k_end)
            for r in range(b.rows.start, b.rows.stop):  # one batch row's heads: views, never copies
                scores = torch.matmul(q[r, :, qs], k[r, :, ks].transpose(1, 2))
                if b.empty_queries:
                    scores.masked_fill_(~_allowed(mask, b, q.device), lowest)
                elif b.bias is not None:  # adding a -inf tile is ~20x faster than masked_fill_ on the block
                    scores[..., b.mask_from :].add_(b.bias)
                # CPU softmax accumulates in fp32 for bf16 inputs; an explicit upcast only added copies
                probs = torch.softmax(scores, dim=-1)
                kept = probs  # the kept probabilities, already scaled by 1 / (1 - p)
                if dropout > 0:
                    kept = dropout_probabilities(probs, dropout)
                out[r, :, qs] = torch.matmul(kept, v[r, :, ks])
                saved.append((probs, kept))
        ctx.save_for_backward(q, k, v, out)
        ctx.blocks, ctx.saved, ctx.scaling, ctx.mask = blocks, saved, scaling, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        q, k, v, out = ctx.saved_tensors  # q already scaled
        batch, heads, t, d = q.shape

        def buffer(zero: bool) -> torch.Tensor:  # (B, H, T, D) views of (B, T, H, D), as the output
            make = torch.zeros if zero else torch.empty
            return make(batch, t, heads, d, dtype=q.dtype, device=q.device).transpose(1, 2)

        dq = buffer(zero=False)  # every query is in exactly one block: written, never accumulated
        dk, dv = buffer(zero=True), buffer(zero=True)
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # rowsum(P * dP), per query and head
        pairs = iter(ctx.saved)
        for b in ctx.blocks:
            qs, ks = slice(b.q_start, b.q_end), slice(b.k_start, b.k_end)
            for r in range(b.rows.start, b.rows.stop):
                probs, kept = next(pairs)
                d_out = grad_out[r, :, qs]
                dv[r, :, ks] += torch.matmul(kept.transpose(1, 2), d_out)
                d_kept = torch.matmul(d_out, v[r, :, ks].transpose(1, 2))
                # with kept = P * M (M: 0 where dropped, 1 / (1 - p) where kept) and dP = M * dKept:
                # dScores = P * (dP - rowsum) = kept * dKept - P * rowsum
                d_scores = d_kept.mul_(kept).addcmul_(probs, row_dot[r, :, qs].expand_as(probs), value=-1)
                if b.empty_queries:  # uniform weights over masked keys depend on neither queries nor keys
                    d_scores.masked_fill_(~_allowed(ctx.mask, b, q.device), 0)
                dq[r, :, qs] = torch.matmul(d_scores, k[r, :, ks]).mul_(ctx.scaling)
                dk[r, :, ks] += torch.matmul(d_scores.transpose(1, 2), q[r, :, qs])
        return dq, dk, dv, None, None, None, None


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
                             dropout: float, mask: torch.Tensor | None = None,
                             block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(QK^T * scaling + causal/padding mask), dropout, times V. Shapes (B, H, T, D) -> (B, H, T, D).

    ``mask``: transformers' 4-D boolean mask (True = may attend, causality included) or None for causal
    only. Rows that may attend to nothing get a uniform distribution over the causal keys instead of NaN.
    """
    batch, heads, t, _ = query.shape
    blocks = query_blocks(mask, batch, heads, t, block)
    return _BlockedAttention.apply(query, key, value, mask, blocks, scaling, dropout)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (B, T, H, D) like its SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # training only: with dropout (SDPA's CPU flash kernel takes none), or with a mask (packed rows and
    # padding, where SDPA computes the whole masked square); plain causal attention without dropout stays
    # on SDPA's flash kernel
    usable = (module.training and (dropout > 0 or attention_mask is not None)
              and query.shape[2] == key.shape[2] > 1
              and (attention_mask is None or attention_mask.dtype == torch.bool)
              and getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("position_bias") is None)
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = blocked_causal_attention(query, key, value, scaling=scale, dropout=dropout, mask=attention_mask)
    return out.transpose(1, 2), None  # (B, T, H, D), contiguous already


def register() -> str:
    """Make ``NAME`` known to transformers (attention function and its SDPA-style boolean mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
