"""The measured side of the plan: what a rank really held at its peak.

On a GPU, torch's allocator counts it (``max_memory_allocated``, the whole run). On a CPU, where the
allocator counts nothing, tensor storage is counted from the model's build to the end of the first
optimizer step (every model state exists by then, and the step's activations peak in it) by the same
counter the planner traces with; only CPU runs pay for it, and only until the first step ends.
"""

from __future__ import annotations

import torch

from bookgen.planning.trace import LiveBytes


class MemoryProbe:
    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu
        self._counter: LiveBytes | None = None
        self._peak: int | None = None
        if not on_gpu:
            self._counter = LiveBytes()
            self._counter.__enter__()

    def first_step_done(self) -> None:
        """Stop counting (CPU): every state exists and the first step's activations have come and gone."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._peak, self._counter = self._counter.peak, None

    def peak(self) -> int | None:
        """Bytes at the peak; None where the first step never ran."""
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        return self._peak
