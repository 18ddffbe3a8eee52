"""One bookgen training run as launcher/run.py starts it, probed for the GPU check: which attention kernels
ran, a short profiler trace, and the host's waits for the device per step.

    torchrun ... bench/gpu_probe.py OUT_PREFIX --cfg EXP.yaml

Steps PROFILE (after compilation, inside the benchmark's warm-up) run under torch.profiler: the trace goes to
OUT_PREFIX.trace.json and the CUDA kernels whose names say attention (flash, efficient, varlen, fmha, sdpa)
to OUT_PREFIX.json. From the end of the warm-up on, torch.cuda.set_sync_debug_mode("warn") reports every
synchronising call; they are counted per step, split into log steps and the others (bookgen's target: none
on a step that does not log). Rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from itertools import count
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bookgen.train import loop  # noqa: E402
from launcher.run import run  # noqa: E402

PROFILE = range(4, 9)  # optimizer steps, 1-based: after compilation, inside a warm-up of 10
SYNC_FROM = 11
ATTENTION_WORDS = ("flash", "efficient", "varlen", "fmha", "attention", "sdpa")


def main() -> int:
    prefix, argv = Path(sys.argv[1]), sys.argv[2:]
    attention: dict[str, int] = {}
    starts: list[int] = []  # warnings seen when each step from SYNC_FROM on began
    train_step, profiler, calls = loop.train_step, torch.profiler.profile(activities=_activities()), count(1)
    catcher, caught = warnings.catch_warnings(record=True), None  # caught: the warnings, from SYNC_FROM on

    def probed(*args, **kwargs):
        nonlocal caught
        k = next(calls)
        if k == PROFILE.start:
            profiler.__enter__()
        if k == SYNC_FROM and torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
            caught = catcher.__enter__()
            warnings.simplefilter("always")
        if caught is not None:
            starts.append(len(caught))
        result = train_step(*args, **kwargs)
        if k == PROFILE.stop - 1:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(f"{prefix}.trace.json")
            for event in profiler.key_averages():
                if "cuda" in str(event.device_type).lower() and any(w in event.key.lower() for w in ATTENTION_WORDS):
                    attention[event.key] = event.count
        return result

    loop.train_step = probed
    try:
        return run(argv)
    finally:
        syncs = {}
        if caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            ends = [*starts[1:], len(caught)]
            syncs = {SYNC_FROM + i: end - start for i, (start, end) in enumerate(zip(starts, ends, strict=True))}
        if os.environ.get("RANK", "0") == "0":
            Path(f"{prefix}.json").write_text(json.dumps({"attention_kernels": attention, "syncs": syncs}, indent=1))


def _activities() -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


if __name__ == "__main__":
    sys.exit(main())
