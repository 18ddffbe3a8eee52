"""How long a step and a run take: the FLOPs a token costs, at a model FLOPs utilisation (MFU).

The MFU is the one the newest comparable run measured (same model, same GPU kind: its run_summary.json
records both), else :data:`DEFAULT_MFU`: bf16 training of GPT-2/Llama-class models on H100s by
PyTorch code reaches 30-40% (nanoGPT-class code 32-38%, llm.c about 40%; transformers' Trainer compiled
reached 23% in bookgen's own H100 run), so 30% is a middle figure, stated wherever it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MFU = 0.30


@dataclass(frozen=True, kw_only=True, slots=True)
class TimePlan:
    flops_per_token: float
    tokens_per_step: int  # over all ranks, padding included (line by line: an upper bound)
    step_seconds: float | None  # None: no peak known for this device (CPUs, fp32, an unlisted GPU)
    steps: int | None  # None: not known until the data is prepared
    mfu: float | None
    mfu_from: str  # where the MFU comes from

    @property
    def run_seconds(self) -> float | None:
        if self.step_seconds is None or self.steps is None:
            return None
        return self.step_seconds * self.steps


def plan_time(*, flops_per_token: float, tokens_per_step: int, devices: int, peak: float | None,
              steps: int | None, measured: tuple[float, str] | None) -> TimePlan:
    """``peak``: one device's FLOP/s; ``measured``: (MFU, run folder) of a comparable run."""
    mfu, origin = (measured[0], f"measured by {measured[1]}") if measured else (DEFAULT_MFU, "bookgen's default")
    seconds = None if peak is None else flops_per_token * tokens_per_step / (devices * peak * mfu)
    return TimePlan(flops_per_token=flops_per_token, tokens_per_step=tokens_per_step, step_seconds=seconds,
                    steps=steps, mfu=mfu if peak is not None else None, mfu_from=origin)


def comparable_mfu(runs_folder: Path, model: str, device: str) -> tuple[float, str] | None:
    """The MFU of the newest finished run in ``runs_folder`` that trained ``model`` on ``device``."""
    found = []
    for summary in runs_folder.glob("*/run_summary.json"):
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("model") == model and data.get("device") == device \
                and isinstance(data.get("mfu"), (int, float)) and data["mfu"] > 0:
            found.append((summary.stat().st_mtime, float(data["mfu"]), str(summary.parent)))
    return max(found)[1:] if found else None
