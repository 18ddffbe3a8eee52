"""The batch layout: how one optimizer step's examples are spread over micro-batches, accumulation and ranks.

Computed once from the experiment and the world size, then handed to the step plan, the training step, the
DeepSpeed config and the checkpoint, so that no module multiplies the three numbers on its own. The step plan
(steps an epoch, steps in all) follows from it and the training split's size.
"""

from __future__ import annotations

from dataclasses import dataclass

from bookgen.config import TrainConfig
from bookgen.errors import BookgenError


@dataclass(frozen=True, slots=True)
class BatchLayout:
    micro_batch_size: int  # examples per rank per forward pass
    grad_accum_steps: int  # micro-batches per rank per optimizer step
    world_size: int  # ranks

    @classmethod
    def of(cls, train: TrainConfig, world_size: int) -> BatchLayout:
        return cls(train.micro_batch_size, train.grad_accum_steps, world_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches in one optimizer step over all ranks."""
        return self.grad_accum_steps * self.world_size

    @property
    def global_batch(self) -> int:
        """Examples in one optimizer step over all ranks."""
        return self.micro_batch_size * self.micro_batches


@dataclass(frozen=True, slots=True)
class StepPlan:
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(n_examples: int, train: TrainConfig, world_size: int) -> StepPlan:
    global_batch = BatchLayout.of(train, world_size).global_batch
    per_epoch = n_examples // global_batch  # a last, partial global batch is not a step
    if per_epoch == 0:
        raise BookgenError(f"the training split has {n_examples} examples, fewer than one global batch of "
                           f"{global_batch} (train.micro_batch_size x train.grad_accum_steps x {world_size} ranks)")
    total = train.max_steps if train.max_steps is not None else train.epochs * per_epoch
    return StepPlan(global_batch, per_epoch, total)
