"""One optimizer step: the micro-batches of each rank, the loss weighting and the engine's update. Nothing
here reads the device: the step's numbers stay on it (:class:`StepNumbers`) until the loop reads a whole
logging interval at once (:mod:`bookgen.train.readout`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bookgen.config import TrainConfig
from bookgen.data.batch_layout import BatchLayout
from bookgen.data.batches import (
    Examples,
    micro_batch_indices,
    model_inputs,
    predicted_tokens,
    step_token_counts,
    to_device,
)
from bookgen.distributed import DistEnv
from bookgen.model.attention import uses_causal_attention


@dataclass(slots=True)
class StepNumbers:
    """One step's numbers: the device's, not yet read, and the host's, known without it."""

    loss_sum: torch.Tensor  # this rank's micro-batch losses summed (float64, on the device)
    grad_norm: torch.Tensor | None  # before clipping, over all ranks' reduced gradients (on the device)
    tokens: int  # non-padding tokens over all ranks
    input_tokens: int  # tokens fed to the model over all ranks, padding included
    lr: float


def train_step(engine: Any, examples: Examples, order: Any, step_in_epoch: int, t: TrainConfig,
               dist: DistEnv, pad_id: int, *, layout: BatchLayout | None = None, causal: bool | None = None
               ) -> StepNumbers:
    """One optimizer step: ``grad_accum_steps`` micro-batches on each rank, then the engine's update.
    ``layout`` and ``causal`` (bookgen's causal attention is in use): decided once by the run, else here."""
    lr = float(engine.get_lr()[0])  # the scheduler's host number
    layout = layout or BatchLayout.of(t, dist.world_size)
    loss_kwargs: dict[str, torch.Tensor] = {}  # micro_batches: the model's own per-micro-batch mean
    if t.loss_average == "tokens":
        total = predicted_tokens(examples.targets, order, step=step_in_epoch, global_batch=layout.global_batch)
        # each micro-batch's loss = its summed NLL / (total / parts); DeepSpeed then divides by the
        # accumulation steps and averages over ranks, leaving sum(NLL) / total for the whole step.
        # A tensor, not a float: a compiled model would recompile for every new Python number.
        loss_kwargs["num_items_in_batch"] = to_device(torch.tensor(max(total, 1) / layout.micro_batches),
                                                      engine.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    grad_norm: torch.Tensor | None = None
    causal = uses_causal_attention(engine) if causal is None else causal
    for micro in range(t.grad_accum_steps):
        picked = micro_batch_indices(order, step=step_in_epoch, micro=micro, rank=dist.rank, layout=layout)
        loss = engine(**model_inputs(examples.batch(picked, pad_id), engine.device, bookgen_attention=causal,
                                     dynamic_width=examples.dynamic_width), use_cache=False,
                      **loss_kwargs).loss  # the logits are dropped here: none outlive their forward's backward
        engine.backward(loss)  # DeepSpeed divides by the accumulation steps; we log the unscaled loss
        loss_sum += loss.detach()
        del loss
        if micro == t.grad_accum_steps - 1:
            grad_norm = reduced_grad_norm(engine)
        engine.step()  # updates only at the accumulation boundary
    if grad_norm is None:  # DeepSpeed's ZeRO and mixed-precision optimizers measure it in their step
        grad_norm = _as_device_number(engine.get_global_grad_norm(), engine.device)
    tokens, input_tokens = step_token_counts(examples, order, step=step_in_epoch, layout=layout)
    return StepNumbers(loss_sum, grad_norm, tokens, input_tokens, lr)


def _as_device_number(value: Any, device: torch.device) -> torch.Tensor | None:
    """DeepSpeed's norm as a tensor of its own: a copy, as its optimizer may reuse the buffer next step."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.detach().clone().reshape(())
    return torch.tensor(float(value), device=device)


def reduced_grad_norm(engine: Any) -> torch.Tensor | None:
    """The gradient norm where DeepSpeed does not record one: with a plain torch optimizer (ZeRO-0 in fp32)
    the gradients are whole and already all-reduced after the boundary's backward, so it is measured here,
    before the step clips them (on the device: nothing waits for it). None where the engine's optimizer
    records it itself (ZeRO 1-3, bf16/fp16), read after the step with ``engine.get_global_grad_norm()``."""
    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
