"""Causal attention for training with attention dropout on CPU, registered with transformers.

With ``dropout_p > 0`` PyTorch's CPU SDPA leaves its flash kernel for the math path, which builds the
whole T x T score matrix, upper (masked) half included: at block 512 that path takes about half of a
GPT-2 training step on this CPU. Here queries go in blocks, each against only the keys it may see, so
the masked half is never computed and each block's scores stay small; the maths is the eager one
(softmax, dropout on the probabilities, times V), so results match up to rounding. Everything else
(eval, generation, GPUs, dropout 0) goes to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch

NAME = "bookgen_sdpa"
QUERY_BLOCK = 128  # measured: 64-128 equally fast at block 512, 256 slower


def blocked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
                             dropout: float, mask: torch.Tensor | None = None,
                             block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(QK^T * scaling + causal/padding mask), dropout, times V. Shapes (B, H, T, D) -> (B, H, T, D).

    ``mask``: transformers' 4-D boolean mask (True = may attend, causality included) or None for causal
    only. Rows that may attend to nothing get a uniform distribution instead of NaN, as the eager path does.
    """
    t = query.shape[2]
    lowest = torch.finfo(query.dtype).min
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        scores = torch.matmul(query[:, :, start:end] * scaling, key[:, :, :end].transpose(-1, -2))
        if mask is None:
            allowed = torch.ones(end - start, end, dtype=torch.bool, device=query.device).tril(start)
        else:
            allowed = mask[:, :, start:end, :end]
        # CPU softmax accumulates in fp32 for bf16 inputs; an explicit upcast only added copies
        probs = torch.softmax(scores.masked_fill(~allowed, lowest), dim=-1)
        if dropout > 0:
            # zero the dropped probabilities, and scale the (smaller) output instead of the probabilities
            dropped = torch.empty(probs.shape, dtype=torch.bool, device=query.device).bernoulli_(dropout)
            out = torch.matmul(probs.masked_fill(dropped, 0), value[:, :, :end]) * (1 / (1 - dropout))
        else:
            out = torch.matmul(probs, value[:, :, :end])
        outputs.append(out)
    return torch.cat(outputs, dim=2)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (B, T, H, D) like its SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    usable = (dropout > 0 and query.device.type == "cpu" and query.shape[2] == key.shape[2] > 1
              and (attention_mask is None or attention_mask.dtype == torch.bool)
              and getattr(module, "num_key_value_groups", 1) == 1 and kwargs.get("position_bias") is None)
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = blocked_causal_attention(query, key, value, scaling=scale, dropout=dropout, mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``NAME`` known to transformers (attention function and its SDPA-style boolean mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
