"""Rank entry for the device-read test: trains as launcher/run.py does, recording the host's reads of device
numbers in every step of the loop, as a GPU run would train (without the CPU-only seam). Run like
launcher/run.py with the output file first: device_reads.py OUT.json --cfg EXP.yaml [...]. Each rank writes
OUT.json.<rank>: {"steps": [{"step": k, "reads": [where, ...]}, ...], "graph_breaks": {...}}, ``where``
naming the package that read (deepspeed, transformers, bookgen) and its functions.

A read is what makes the host wait for the device: aten's ``_local_scalar_dense`` (``.item()``, ``float(t)``,
``bool(t)``, ``int(t)``, seen below autograd by a dispatch mode, so DeepSpeed's and transformers' reads count
too), ``Tensor.tolist`` and DeepSpeed's ``accelerator.synchronize``. A step's reads run from the start of its
``train_step`` to the start of the next one (or the loop's end): its logging and stop checks are its own.
torch.compile does not compile under a dispatch mode, so a compiled model's forward runs outside it: its
reads could only come from graph breaks, which are recorded as "graph_breaks" (none expected).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen import cpu  # noqa: E402
from bookgen.train import loop  # noqa: E402
from launcher.run import run  # noqa: E402


class Reads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict] = []
        self.current: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.note()
        return func(*args, **(kwargs or {}))

    def note(self) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        owner = next((name for name in ("deepspeed", "transformers", "bookgen") if f"/{name}/" in frames[-1].filename),
                     "other")
        self.current.append(owner + ": " + " < ".join(f"{Path(f.filename).name}:{f.name}" for f in frames[-4:][::-1]))

    def close_step(self) -> None:
        if self.steps:
            self.steps[-1]["reads"] = self.current
        self.current = []


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    reads = Reads()
    tolist, train_step, inner_loop = torch.Tensor.tolist, loop.train_step, loop._loop

    def counted_tolist(self):
        reads.note()
        return tolist(self)

    def counted_step(*args, **kwargs):
        reads.close_step()
        result = train_step(*args, **kwargs)
        reads.steps.append({"step": len(reads.steps) + 1, "reads": []})
        return result

    def counted_loop(*args, **kwargs):
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        synchronize = accelerator.synchronize

        def counted_synchronize(*a, **k):
            reads.note()
            return synchronize(*a, **k)

        accelerator.synchronize = counted_synchronize
        torch.Tensor.tolist = counted_tolist
        try:
            with reads:
                return inner_loop(*args, **kwargs)
        finally:
            reads.close_step()
            torch.Tensor.tolist = tolist
            accelerator.synchronize = synchronize

    def engine_built(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        compiled = getattr(engine.module, "_compiled_call_impl", None)
        if compiled is not None:  # torch.compile does not compile under a dispatch mode: leave it to run

            def forward(*a, **k):
                with _disable_current_modes():
                    return compiled(*a, **k)

            engine.module._compiled_call_impl = forward
        return engine

    build_engine = loop.build_engine
    loop.train_step, loop._loop, loop.build_engine = counted_step, counted_loop, engine_built
    # the CPU seam exists only on CPUs, where a read waits for nothing; a GPU trains without it
    cpu.speed_up_training = lambda model: 0
    try:
        return run(argv)
    finally:
        from torch._dynamo.utils import counters

        breaks = {str(reason): n for reason, n in counters["graph_break"].items()}
        Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(json.dumps({"steps": reads.steps,
                                                                             "graph_breaks": breaks}))


if __name__ == "__main__":
    sys.exit(main())
