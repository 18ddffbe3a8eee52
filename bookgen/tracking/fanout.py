"""One call per event for every tracker; one that fails mid-run is dropped with one warning."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from bookgen.faults import Fault

Status = Literal["finished", "preempted", "interrupted", "failed"]


class Tracker(Protocol):
    name: str

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to reopen this tracked run (kept in trackers.json)."""

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """(step, numbers) rows in step order: one call per log step."""

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None: ...

    def log_files(self, paths: list[Path]) -> None: ...

    def close(self, status: Status) -> None: ...


class Trackers:
    """The run's trackers. ``logged`` maps a metric to the last step a previous attempt of this run sent
    (read from metrics.jsonl before a resume trims it): those steps are not sent twice."""

    def __init__(self, trackers: list[Tracker], logged: Mapping[str, int] | None = None,
                 fault: Fault | None = None) -> None:
        self._live = list(trackers)
        self._injected = fault  # the failure tests' (bookgen.faults); None in a run
        self._logged = dict(logged or {})
        # a samples table goes with that round's measures (samples_* in metrics.jsonl)
        self._logged_samples = max((v for k, v in self._logged.items() if k.startswith("samples_")), default=-1)

    def metrics(self, records: list[Mapping[str, Any]]) -> None:
        """Records (each with its ``step``) as (step, numbers) rows, without what was sent before."""
        rows = []
        for record in records:
            step = record["step"]
            values = {k: float(v) for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")
                      and step > self._logged.get(k, -1)}
            if values:
                rows.append((step, values))
        if rows:
            self._each("log_metrics", rows)

    def _fault(self, method: str, args: tuple[Any, ...]) -> None:
        if (self._injected is not None and method == "log_metrics"
                and any(self._injected.tracker_fails(step) for step, _ in args[0])):
            raise OSError("injected tracker failure")

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if step > self._logged_samples:
            self._each("log_samples", step, rows)

    def files(self, paths: list[Path]) -> None:
        present = [p for p in paths if p.is_file()]
        if present:
            self._each("log_files", present)

    def close(self, status: Status) -> None:
        self._each("close", status)
        self._live = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self._live):
            try:
                self._fault(method, args)
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never ends the run it watches
                self._live.remove(tracker)
                if method != "close":
                    _end_quietly(tracker)
                print(f"bookgen: warning: the {tracker.name} tracker failed ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); training goes on without it (metrics.jsonl has every record)",
                      file=sys.stderr, flush=True)


def _end_quietly(tracker: Tracker) -> None:
    """End a dropped tracker's run as failed, if it still can: its store shows it stopped, not running."""
    try:
        tracker.close("failed")
    except Exception:  # noqa: BLE001, S110 - it has already failed once; its warning is enough
        pass
