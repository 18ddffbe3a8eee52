"""The measured side of the plan: what a rank really held at its peak.

On a GPU, torch's allocator counts it (``max_memory_allocated``, the whole run). On a CPU, where the
allocator counts nothing, tensor storage is counted from the model's build to the end of the second
optimizer step by the same counter the planner traces with: the optimizer's states appear in the first
step's update, so the second is the first whose activations meet every model state. Only CPU runs pay for
it, and only for two steps.
"""

from __future__ import annotations

import torch

from bookgen.planning.trace import LiveBytes

STEPS = 2  # counted on a CPU


class MemoryProbe:
    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu
        self._counter: LiveBytes | None = None
        self._peak: int | None = None
        self._steps = 0
        if not on_gpu:
            self._counter = LiveBytes("cpu")
            self._counter.__enter__()

    def step_done(self) -> None:
        self._steps += 1
        if self._steps == STEPS:
            self.stop()

    @property
    def measured(self) -> bool:
        """The steps it measures have run (their peak is known)."""
        return self._steps >= STEPS

    def stop(self) -> None:
        """Stop counting (CPU); the peak so far stands."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._peak, self._counter = (self._counter.peak if self._steps else None), None

    def peak(self) -> int | None:
        """Bytes at the peak; None where no step ran."""
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        return self._peak
