"""The training loss over chunks of tokens, so that no step holds the whole batch's logits.

A causal LM's forward computes logits for every token (batch x block x vocabulary: for Llama 3's 128,256
entries, 2 x 4,096 tokens are 4.2 GB in fp32) and its loss keeps them for the backward. Here the decoder's
hidden states go through the head and the cross-entropy a chunk of tokens at a time, each chunk under
activation checkpointing: its logits are dropped after its forward and made again in the backward. The
head runs one more time (about a third of its arithmetic, which is a large share only for small models with
large vocabularies), in exchange for logits that never exceed one chunk. The sum, the shift and the
normalisation are transformers' own (``ForCausalLMLoss``), so the loss and gradients are the same to
rounding. The head is called as a module: ZeRO-3 gathers its weight for every chunk as it does for a layer.
Prior art: torchtune's chunked cross-entropy, Liger's fused linear cross-entropy (CUDA kernels).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bookgen.errors import BookgenError

IGNORE_INDEX = -100


def use_chunked_loss(model: Any, chunk_tokens: int) -> None:
    """Make ``model`` (a transformers causal LM) compute its training loss over chunks of ``chunk_tokens``
    tokens. A forward without labels (evaluation, generation) is the model's own."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) is not None or getattr(config, "logit_scale", None):
        raise BookgenError(f"train.loss_chunk_tokens: {type(model).__name__} transforms its logits after the head "
                           "(soft-capping or scaling), which the chunked loss does not; unset it for this model")
    from transformers.modeling_outputs import CausalLMOutputWithPast  # once, not in every step's forward

    own_forward = model.forward

    def forward(self: Any, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if labels is None:
            return own_forward(input_ids=input_ids, **kwargs)
        kwargs.pop("logits_to_keep", None)
        decoder = getattr(self, self.base_model_prefix)
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
        loss = chunked_causal_loss(hidden, labels, self.get_output_embeddings(), chunk_tokens,
                                   kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)  # this instance only: its weights and files are unchanged


def chunked_causal_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int,
                        num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """transformers' causal LM loss (tokens < n predict n; the sum over ``num_items_in_batch``, else the mean
    over the predicted tokens) from the decoder's last hidden states, ``chunk_tokens`` tokens at a time."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_summed_nll, head, flat[part], targets[part], use_reentrant=False,
                                   preserve_rng_state=False)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _summed_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
