"""bookgen's training attention, registered with transformers: causal SDPA without a mask, or a
variable-length kernel over the summaries packed into a row.

transformers builds an attention mask for every forward. Finding that a batch needs none means reading the
mask back (the host waits for the GPU), and under torch.compile it cannot read it, so SDPA gets a dense
(B, 1, T, T) mask, which rules out the flash kernel. bookgen's batches need no mask: rows are right-padded,
and under causal attention a real token never sees the padding after it; packed summaries come with their
boundaries (``cu_seq_lens_q``, from the collator on the host). This function is registered for attention and
not for masks, so transformers builds none ("custom attention without equivalent mask creation") and:

- without boundaries (``none``, ``concat``): SDPA with ``is_causal=True``, the flash kernel on GPUs;
- with them (``documents``), on CUDA in half precision without attention dropout, with torch's
  ``varlen_attn``: one variable-length flash call over every summary of the batch;
- otherwise (CPU, fp32, dropout, older torch): SDPA with the block-diagonal causal mask built on the device
  from the boundaries, the same maths.

Training and evaluation only: :func:`generation_attention` hands generation (KV cache, left padding) back to
transformers' SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

NAME = "bookgen_causal"
GENERATION = "sdpa"


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, causal_attention)
    return NAME


def varlen_kernel() -> Any:
    """torch's variable-length flash attention (PyTorch >= 2.9, CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """(B, H, T, D) queries, keys and values -> (B, T, H, D) output, as transformers' attention functions."""
    gqa = key.shape[1] != query.shape[1]
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2), None
    kernel = varlen_kernel() if varlen_fits(query, dropout) else None
    if kernel is not None:
        b, h, t, d = query.shape
        flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value)]
        longest = int(kwargs["max_length_q"])  # the rows' width: for a compiled model the block size, a constant
        out = kernel(*flat, bounds, bounds, longest, longest, scale=scaling, window_size=(-1, 0), enable_gqa=gqa)
        return out.reshape(b, t, h, d), None
    mask = document_mask(bounds, query.shape[0], query.shape[2])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2), None


def varlen_fits(query: torch.Tensor, dropout: float) -> bool:
    """The flash kernel's terms: CUDA, half precision, no attention dropout (it has none)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0


def document_mask(bounds: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(rows, 1, width, width) booleans: causal within each segment of the flattened batch. ``bounds`` are
    the segments' cumulative starts over all rows (each row's segments fill it; trailing repeats are empty
    segments). Built on the device: ``output_size`` spares repeat_interleave a read of the total."""
    lengths = bounds[1:] - bounds[:-1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=bounds.device), lengths,
                                      output_size=rows * width).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=bounds.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def uses_causal_attention(model: Any) -> bool:
    """Whether a model (or a DeepSpeed engine around one) trains through :func:`causal_attention`."""
    module = getattr(model, "module", model)
    return getattr(getattr(module, "config", None), "_attn_implementation", None) == NAME


@contextmanager
def generation_attention(model: Any) -> Iterator[None]:
    """transformers' SDPA (which takes masks and a KV cache) while generating with a model trained through
    :func:`causal_attention`; the training attention again afterwards."""
    config = model.config
    before = config._attn_implementation
    if before == NAME:
        config._attn_implementation = GENERATION
    try:
        yield
    finally:
        config._attn_implementation = before
