"""MLflow: the run's settings as params, metrics at their steps, samples as JSON artifacts, the end files as
artifacts. With no server named the store is local: an SQLite database and the artifacts in one folder."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bookgen.config import MlflowConfig
from bookgen.tracking.fanout import Status
from bookgen.tracking.params import flatten

PARAMS_PER_CALL = 100  # MLflow's limits for one log_batch
METRICS_PER_CALL = 1000
PARAM_VALUE_CHARS = 6000  # MLflow's limit for one value
END_STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED", "interrupted": "KILLED"}


def tracking_uri(settings: MlflowConfig, *, create: bool = True) -> tuple[str, str | None]:
    """(tracking URI, artifact folder for a new experiment): a URL or database URI as given; a folder (the
    default ``./mlruns`` included) becomes an SQLite store inside it, with the artifacts beside (the folder is
    made unless ``create`` is false)."""
    given = settings.uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" in given or given.startswith(("databricks", "sqlite:")):
        return given, None
    folder = Path(given.removeprefix("file:")).expanduser().resolve()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, settings: MlflowConfig, run_dir: Path, params: Mapping[str, Any],
                 previous: Mapping[str, Any] | None) -> None:
        from mlflow import MlflowClient

        if previous:  # the store the run started in, wherever this attempt starts from
            self.uri, artifacts = previous["tracking_uri"], None
        else:
            self.uri, artifacts = tracking_uri(settings)
        self._client = MlflowClient(tracking_uri=self.uri)
        if previous:
            self.run_id = previous["run_id"]
            self._client.update_run(self.run_id, status="RUNNING")
            return
        name = settings.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bookgen"
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._client.create_experiment(name, artifact_location=artifacts))
        run = self._client.create_run(experiment_id, run_name=settings.run_name or run_dir.name,
                                      tags={"bookgen.output_dir": str(run_dir)})
        self.run_id = run.info.run_id
        self._log_params(flatten(params))

    def _log_params(self, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _text(value)[:PARAM_VALUE_CHARS]) for key, value in flat.items()]
        for start in range(0, len(items), PARAMS_PER_CALL):
            self._client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_CALL])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
        for start in range(0, len(metrics), METRICS_PER_CALL):  # one database transaction a call
            self._client.log_batch(self.run_id, metrics=metrics[start:start + METRICS_PER_CALL])

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._client.log_text(self.run_id, json.dumps(rows, indent=1, ensure_ascii=False),
                              f"samples/step_{step:08d}.json")

    def log_files(self, paths: list[Path]) -> None:
        for path in paths:
            self._client.log_artifact(self.run_id, str(path))

    def close(self, status: Status) -> None:
        self._client.set_terminated(self.run_id, status=END_STATUS[status])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
