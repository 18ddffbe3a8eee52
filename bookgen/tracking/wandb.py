"""Weights & Biases: the run's settings as its config, metrics at their steps, samples as a Table, the end
files as an artifact. ``WANDB_MODE=offline`` keeps everything under ``<output_dir>/wandb`` for a later
``wandb sync``; a resumed run reopens the same W&B run id."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bookgen.config import WandbConfig
from bookgen.tracking.fanout import Status

SAMPLE_COLUMNS = ("step", "sample_index", "stopped", "tokens", "text")


class WandbTracker:
    name = "wandb"

    def __init__(self, settings: WandbConfig, run_dir: Path, params: Mapping[str, Any],
                 previous: Mapping[str, Any] | None) -> None:
        import wandb

        self._wandb = wandb
        run_id = previous.get("id") if previous else None
        # console="off": bookgen's progress bar and log lines stay as they are; W&B keeps its own quiet
        self._run = wandb.init(
            project=settings.project or os.environ.get("WANDB_PROJECT") or "bookgen",
            entity=settings.entity, name=settings.name or run_dir.name, tags=settings.tags or None,
            id=run_id, resume="allow" if run_id else None, dir=str(run_dir), config=dict(params),
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        )

    def state(self) -> dict[str, Any]:
        return {"id": self._run.id, "project": self._run.project}

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            self._run.log(values, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        table = self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])
        self._run.log({"samples": table}, step=step)

    def log_files(self, paths: list[Path]) -> None:
        artifact = self._wandb.Artifact(f"run-{self._run.id}-results", type="results")
        for path in paths:
            artifact.add_file(str(path), name=path.name)
        self._run.log_artifact(artifact)

    def close(self, status: Status) -> None:
        if status == "preempted":
            self._run.mark_preempting()
        self._run.finish(exit_code=0 if status == "finished" else 1)
