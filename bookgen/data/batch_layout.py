"""The batch layout: how one optimizer step's examples are spread over micro-batches, accumulation and ranks.

Computed once from the experiment and the world size, then handed to the step plan, the training step, the
DeepSpeed config and the checkpoint, so that no module multiplies the three numbers on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from bookgen.config import TrainConfig


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
