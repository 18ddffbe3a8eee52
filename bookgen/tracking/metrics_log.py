"""Rank 0's records of a run: metrics.jsonl (and through it the trackers), and the loss-curve PNG."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bookgen.fileio import naming, open_regular, read_jsonl_torn, write_text_atomic, written_aside
from bookgen.tracking.fanout import Status, Trackers


class MetricsLog:
    """Appends one JSON object per line and hands each record to the run's trackers; on resume, lines past
    the resumed step are dropped first, and what they held is not sent to the trackers again."""

    def __init__(self, run_dir: Path, *, resume_step: int = 0, notify: Callable[[str], None] = print) -> None:
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sent_before = self._truncate_after(resume_step, notify)
        self._fh = open_regular(self.path, "a")
        self.trackers = Trackers([])

    def _truncate_after(self, step: int, notify: Callable[[str], None]) -> dict[str, int]:
        """Drop the records past ``step``; returns each key's last step in the file as it was. The shorter file
        is written aside and renamed: a kill during the rewrite leaves the old file, never an empty one."""
        open_regular(self.path, "a").close()  # refuses a planted link before anything is read or replaced
        records, torn = read_jsonl_torn(self.path)
        if torn is not None:
            notify(f"{self.path}: dropped its last line, cut short by the run that wrote it ({torn[:60]!r})")
        last: dict[str, int] = {}
        for record in records:
            for key in record:
                last[key] = max(last.get(key, -1), record.get("step", 0))
        keep = [r for r in records if r.get("step", 0) <= step]
        if torn is not None or len(keep) < len(records):
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        return last

    def write(self, *records: dict[str, Any]) -> None:
        now = time.time()
        stamped = [{"time": now, **record} for record in records]
        with naming(self.path):
            self._fh.write("".join(json.dumps(record) + "\n" for record in stamped))
            self._fh.flush()
        self.trackers.metrics(stamped)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A round of samples for the trackers (a table, an artifact, a text panel); samples.jsonl has them."""
        self.trackers.samples(step, rows)

    def close(self, status: Status = "finished", files: list[Path] | None = None) -> None:
        """Close the log and end the trackers' runs with ``status``, sending ``files`` first."""
        if not self._fh.closed:
            with naming(self.path):
                self._fh.close()
        self.trackers.files(files or [])
        self.trackers.close(status)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with written_aside(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
