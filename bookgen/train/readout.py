"""Reading the training numbers off the device once per logging interval.

Every read of a device number by the host (``.item()``, ``float(t)``, ``.tolist()``) waits for all the work
queued before it. A step therefore keeps its loss and gradient norm on the device (:class:`StepNumbers`),
and the loop reads the whole interval at its log step: one all-reduce of one tensor (every step's summed
loss, rank 0's gradient norms, each rank's stop request) and one read. The GPU runs a whole interval ahead
of the host in between. The loop makes every step that evaluates, saves or ends the run a log step, so a
non-finite loss is still seen before anything records the weights it poisoned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bookgen import distributed
from bookgen.train.step import StepNumbers


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step's numbers as the host logs them."""

    step: int
    epoch: int
    loss: float  # mean over the step's micro-batches, over all ranks
    grad_norm: float | None
    tokens: int
    input_tokens: int
    lr: float


@dataclass(slots=True)
class Interval:
    """The steps since the last read, their device numbers not read yet."""

    steps: list[tuple[int, int, StepNumbers]] = field(default_factory=list)  # (step, epoch, numbers)

    def add(self, step: int, epoch: int, numbers: StepNumbers) -> None:
        self.steps.append((step, epoch, numbers))

    def read(self, *, micro_batches: int, is_main: bool, stop_requested: bool) -> tuple[list[StepRecord], bool]:
        """The interval's records and whether any rank asked to stop, with one collective and one read; the
        interval is empty afterwards."""
        pending, self.steps = self.steps, []
        assert pending, "a log step reads the steps since the last one, at least itself"
        device = pending[0][2].loss_sum.device
        # the norm is the same on every rank: only rank 0's goes into the sum (nan where none was measured)
        norms = [(n.grad_norm if n.grad_norm is not None else math.nan) if is_main else 0.0 for _, _, n in pending]
        read = distributed.all_reduce_sum([*(n.loss_sum for _, _, n in pending), *norms, float(stop_requested)],
                                          device)  # the interval's one wait for the device
        n = len(pending)
        records = [StepRecord(step, epoch, read[i] / micro_batches,
                              None if math.isnan(read[n + i]) else read[n + i], nums.tokens, nums.input_tokens,
                              nums.lr) for i, (step, epoch, nums) in enumerate(pending)]
        return records, read[-1] > 0

