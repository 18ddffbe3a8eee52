"""Data-parallel gradient averaging for ZeRO-0 in fp32, in place in one flat buffer.

DeepSpeed's ZeRO-0 all-reduce copies every gradient into a flat buffer after the backward, scales it, reduces
it and copies it back: for a 6 x 512 GPT-2 three passes over 80 MB, about 90 ms of a 2.5 s step on a CPU,
besides the 60 ms of the all-reduce itself. Here each gradient is copied into the flat buffer (scaled by
1 / world size in the same pass) the moment autograd finishes it, while it is still in cache, and the
parameter's ``.grad`` becomes its view of the buffer: after the all-reduce there is nothing to copy back.
The averaged gradients are DeepSpeed's to the bit: a sum divided by the world size, in the copy where that
division is exact (a power of two) and after the sum otherwise, as DeepSpeed does. Only the boundary
micro-batch's backward copies; the others accumulate into ``.grad`` as before. ZeRO 1-3, fp16/bf16 and
a ``communication_data_type`` of their own keep DeepSpeed's path.

The gradient norm is measured once, after the reduction, and serves both the log and the clipping, which
DeepSpeed's ZeRO-0 does with a norm of its own, an all-reduce of that norm (the same on every rank already)
and a pass multiplying every gradient by min(1, max / norm) even when that is 1. Here the gradients are
scaled only when they are clipped, by DeepSpeed's factor max / (norm + 1e-6); the norm is one vector norm
where DeepSpeed stacks per-tensor norms, so the two agree to rounding.
"""

from __future__ import annotations

from typing import Any

import torch


class FlatGradientSync:
    """Installed on a ZeRO-0 fp32 engine: DeepSpeed calls ``engine.allreduce_gradients`` after each backward
    (it then checks the accumulation boundary itself), which this replaces."""

    def __init__(self, engine: Any, world_size: int) -> None:
        self.engine = engine
        self.world_size = world_size
        # x / 2^k is exact, so scaling before the sum gives the bits of scaling after it, without a pass
        self.prescale = 1 / world_size if world_size & (world_size - 1) == 0 else 1.0
        engine.allreduce_gradients = self.allreduce_gradients
        engine.clip_fp32_gradients = self.clip_gradients
        self.grad_norm: torch.Tensor | None = None  # of the last reduced gradients
        self.params = [p for p in engine.module.parameters() if p.requires_grad]  # a tied weight once
        self.views: dict[torch.nn.Parameter, torch.Tensor] = {}
        if world_size == 1:  # nothing to average: DeepSpeed would still copy everything out and back
            return
        self.flat = torch.empty(sum(p.numel() for p in self.params), dtype=torch.float32,
                                device=self.params[0].device)
        offset = 0
        for p in self.params:
            self.views[p] = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            p.register_post_accumulate_grad_hook(self._take)

    def _take(self, p: torch.nn.Parameter) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return  # the next micro-batches still add to this gradient
        view = self.views[p]
        torch.mul(p.grad, self.prescale, out=view)
        p.grad = view

    def allreduce_gradients(self, bucket_size: int | None = None) -> None:
        del bucket_size  # DeepSpeed's signature; one buffer, one call
        if not self.engine.is_gradient_accumulation_boundary():
            return
        if self.world_size == 1:
            self.grad_norm = norm_of([p.grad for p in self.params if p.grad is not None])
            return
        for p, view in self.views.items():
            if p.grad is None:  # unused this step: a zero contribution, as DeepSpeed gives it
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():  # used by earlier micro-batches, not the boundary's
                torch.mul(p.grad, self.prescale, out=view)
                p.grad = view
        torch.distributed.all_reduce(self.flat)
        if self.prescale == 1.0:
            self.flat.mul_(1 / self.world_size)
        self.grad_norm = torch.linalg.vector_norm(self.flat)

    def clip_gradients(self) -> None:
        """DeepSpeed's ``clip_fp32_gradients`` (called in its step when ``gradient_clipping`` > 0), on the
        norm measured after the reduction."""
        if self.grad_norm is None:
            return
        coef = float(self.engine.gradient_clipping()) / (self.grad_norm + 1e-6)
        if coef < 1:
            if self.world_size > 1:
                self.flat.mul_(coef)
            else:
                torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], coef)


def norm_of(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-norm of all ``grads`` together (None for none): the norm of their per-tensor norms."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None


def install(engine: Any, world_size: int) -> FlatGradientSync | None:
    """Use :class:`FlatGradientSync` where it applies (ZeRO-0, fp32 gradients and communication, no
    pipeline or expert parallelism); None where DeepSpeed's own path stays."""
    applies = (engine.zero_optimization_stage() == 0 and not engine.fp16_enabled() and not engine.bfloat16_enabled()
               and engine.communication_data_type == torch.float32 and not getattr(engine, "has_moe_layers", False)
               and not getattr(engine, "pipeline_parallelism", False)
               and all(p.dtype == torch.float32 for p in engine.module.parameters() if p.requires_grad))
    if not applies:
        return None
    engine.bookgen_grad_sync = FlatGradientSync(engine, world_size)  # for bookgen.step's logged norm
    return engine.bookgen_grad_sync
