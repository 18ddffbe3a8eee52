"""TensorBoard: scalars, the samples as text, the run's settings as a text panel."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bookgen.tracking.fanout import Status


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, folder: Path, params: Mapping[str, Any], previous: Mapping[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))
        if previous is None:  # a resumed run's settings panel is already there
            self._writer.add_text("run", f"```\n{json.dumps(params, indent=2, default=str)}\n```", 0)

    def state(self) -> dict[str, Any]:
        return {}

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        # on disk at once (the writer's own interval is 2 minutes): what a killed run sent is there on resume,
        # which sends only the steps after it
        self._writer.flush()

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        # markdown: each sample its own paragraph, with its index and whether it reached <EOS>
        text = "\n\n".join(f"**{r['sample_index']}** ({'stopped' if r['stopped'] else 'cut'}): {r['text']}"
                           for r in rows)
        self._writer.add_text("samples", text, step)
        self._writer.flush()

    def log_files(self, paths: list[Path]) -> None:
        pass  # the files are in the run folder, next to the event files

    def close(self, status: Status) -> None:
        self._writer.close()
