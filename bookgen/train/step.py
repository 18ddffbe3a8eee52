"""One optimizer step: the micro-batches of each rank, the loss weighting, the engine's update, and the
numbers the loop logs (with the step's only wait for the device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bookgen import distributed
from bookgen.config import TrainConfig
from bookgen.data.batches import Examples, micro_batch_indices, model_inputs, predicted_tokens, to_device
from bookgen.distributed import DistEnv
from bookgen.train.batch_layout import BatchLayout


@dataclass(slots=True)
class StepMetrics:
    loss: float
    tokens: int  # non-padding tokens over all ranks
    input_tokens: int  # tokens fed to the model over all ranks, padding included
    lr: float
    stop_requested: bool
    grad_norm: float | None  # before clipping, over all ranks' reduced gradients


def train_step(engine: Any, examples: Examples, order: Any, step_in_epoch: int, t: TrainConfig, dist: DistEnv,
               pad_id: int, stop_requested: bool) -> StepMetrics:
    """One optimizer step: ``grad_accum_steps`` micro-batches on each rank, then the engine's update."""
    lr = float(engine.get_lr()[0])
    layout = BatchLayout.of(t, dist.world_size)
    parts = layout.micro_batches
    loss_kwargs: dict[str, torch.Tensor] = {}  # micro_batches: the model's own per-micro-batch mean
    if t.loss_average == "tokens":
        total = predicted_tokens(examples.targets, order, step=step_in_epoch, global_batch=layout.global_batch)
        # each micro-batch's loss = its summed NLL / (total / parts); DeepSpeed then divides by the
        # accumulation steps and averages over ranks, leaving sum(NLL) / total for the whole step.
        # A tensor, not a float: a compiled model would recompile for every new Python number.
        loss_kwargs["num_items_in_batch"] = to_device(torch.tensor(max(total, 1) / parts), engine.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens, input_tokens = 0, 0
    grad_norm: torch.Tensor | float | None = None
    for micro in range(t.grad_accum_steps):
        picked = micro_batch_indices(order, step=step_in_epoch, micro=micro, rank=dist.rank, layout=layout)
        batch = examples.batch(picked, pad_id)
        tokens += int(examples.lengths[picked].sum())  # counted on the host: reading a GPU number waits for it
        input_tokens += batch["input_ids"].numel()
        out = engine(**model_inputs(batch, engine.device), use_cache=False, **loss_kwargs)
        engine.backward(out.loss)  # DeepSpeed divides by the accumulation steps; we log the unscaled loss
        if micro == t.grad_accum_steps - 1:
            grad_norm = reduced_grad_norm(engine)
        engine.step()  # updates only at the accumulation boundary
        loss_sum += out.loss.detach()
    # one collective (and the step's only wait for the device) for the logged numbers and the
    # preemption flag, so all ranks stop together
    total_loss, total_tokens, total_inputs, stops = distributed.all_reduce_sum(
        [loss_sum, float(tokens), float(input_tokens), float(stop_requested)], engine.device)
    if grad_norm is None:  # DeepSpeed's ZeRO and mixed-precision optimizers measure it in their step
        grad_norm = engine.get_global_grad_norm()
    return StepMetrics(loss=total_loss / parts, tokens=int(total_tokens), input_tokens=int(total_inputs), lr=lr,
                       stop_requested=stops > 0, grad_norm=None if grad_norm is None else float(grad_norm))


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
