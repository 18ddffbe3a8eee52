"""The measured side of the plan: what a rank really held at its peak.

On a GPU, torch's allocator counts it (``max_memory_allocated``, the whole run). On a CPU, where the
allocator counts nothing, tensor storage is counted from the model's build to the end of the second
optimizer step by the same counter the planner traces with: the optimizer's states appear in the first
step's update, so the second is the first whose activations meet every model state. Only CPU runs pay for
it, and only for two steps. An evaluation, samples or a save between those steps are not counted: their
peak is not a training step's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bookgen.planning.trace import LiveBytes

STEPS = 2  # counted on a CPU


class MemoryProbe:
    def __init__(self, on_gpu: bool, *, compiled: bool = False) -> None:
        """``compiled``: the model runs under torch.compile, which does not compile under a dispatch mode: on a
        CPU such a run is not counted (its measured peak stays unknown) rather than run uncompiled."""
        self.on_gpu = on_gpu
        self._counter: LiveBytes | None = None
        self._peak: int | None = None
        self.held_after: int | None = None  # CPU: bytes still alive when counting stopped (the model states)
        self._steps = 0
        if not on_gpu and not compiled:
            self._counter = LiveBytes("cpu")
            self._counter.__enter__()

    def include(self, model: torch.nn.Module) -> None:
        """Count the model's weights too where they were read from files rather than made by operators."""
        if self._counter is not None:
            self._counter.include([*model.parameters(), *model.buffers()])

    def step_done(self) -> None:
        self._steps += 1
        if self._steps == STEPS:
            self.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is no training step (CPU): what it makes is not counted, what it frees of a step's is."""
        counter = self._counter
        if counter is None:
            yield
            return
        counter.__exit__(None, None, None)
        try:
            yield
        finally:
            counter.__enter__()

    @property
    def measured(self) -> bool:
        """The steps it measures have run (their peak is known)."""
        return self._steps >= STEPS

    def stop(self) -> None:
        """Stop counting (CPU); the peak so far stands."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            if self._steps:
                self._peak, self.held_after = self._counter.peak, self._counter.live
            self._counter = None

    def peak(self) -> int | None:
        """Bytes at the peak; None where no step ran."""
        if self.on_gpu:
            return int(torch.cuda.max_memory_allocated())
        return self._peak  # None where nothing was counted
