"""Start the trackers an experiment asks for, or reopen the ones a resumed run already has."""

from __future__ import annotations

import importlib.util
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bookgen.config import RunConfig
from bookgen.errors import BookgenError
from bookgen.faults import Fault
from bookgen.fileio import write_json_atomic
from bookgen.tracking.fanout import Tracker, Trackers
from bookgen.tracking.mlflow import MlflowTracker, tracking_uri
from bookgen.tracking.tensorboard import TensorBoardTracker
from bookgen.tracking.wandb import WandbTracker

STATE_FILE = "trackers.json"  # each tracker's run id, for a resumed run to append to
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "bookgen[wandb]"),
                    "mlflow": ("mlflow", "bookgen[mlflow]")}


def check_tracker_packages(run: RunConfig) -> None:
    """Preflight: every tracker asked for can be imported (before any data is touched)."""
    for name in run.trackers:
        module, extra = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise BookgenError(f"run.trackers: {name} needs the {module} package, which is not installed: "
                               f"pip install '{extra}', or remove {name} from run.trackers")


def check_tracker_servers(run: RunConfig, timeout_s: float = 5.0) -> None:
    """Preflight: an MLflow server the run will log to answers within ``timeout_s``. MLflow's own client retries
    an unreachable server for minutes, silently, after the data has been prepared and the model built."""
    if "mlflow" not in run.trackers:
        return
    previous = _read_state(run.output_dir / STATE_FILE).get("mlflow") or {}
    uri = previous.get("tracking_uri") or tracking_uri(run.mlflow, create=False)[0]
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a server behind a proxy may not serve /health
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BookgenError(f"run.mlflow.uri: the MLflow server at {uri} does not answer ({reason}; waited at most "
                           f"{timeout_s:.0f} s); start it, correct run.mlflow.uri (or MLFLOW_TRACKING_URI), or "
                           "remove mlflow from run.trackers") from exc


def open_trackers(run: RunConfig, *, params: Mapping[str, Any], resume_step: int,
                  logged: Mapping[str, int], fault: Fault | None = None) -> Trackers:
    """Rank 0: the experiment's trackers, reopened from ``trackers.json`` when resuming (``resume_step`` > 0).
    A tracker that cannot start stops the run here, before training, with its name and reason."""
    run_dir = run.output_dir
    state_path = run_dir / STATE_FILE
    previous = _read_state(state_path) if resume_step > 0 else {}
    trackers: list[Tracker] = []
    state: dict[str, Any] = {}
    try:
        for name in run.trackers:
            tracker = _start(name, run, params, previous.get(name))
            trackers.append(tracker)
            state[name] = tracker.state()
    except Exception as exc:
        for tracker in trackers:
            tracker.close("failed")
        if isinstance(exc, BookgenError):
            raise
        hint = "; with no network, set WANDB_MODE=offline" if name == "wandb" else ""
        raise BookgenError(f"run.trackers: {name} could not start ({type(exc).__name__}: {str(exc)[:400]}){hint}"
                           ) from exc
    if state or state_path.exists():
        write_json_atomic(state_path, state)
    return Trackers(trackers, logged if resume_step > 0 else {}, fault)


def _start(name: str, run: RunConfig, params: Mapping[str, Any], previous: dict[str, Any] | None) -> Any:
    if name == "tensorboard":
        return TensorBoardTracker(run.output_dir / "tensorboard", params, previous)
    if name == "wandb":
        return WandbTracker(run.wandb, run.output_dir, params, previous)
    return MlflowTracker(run.mlflow, run.output_dir, params, previous)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BookgenError(f"{path}: cannot read the trackers' run ids ({exc}); remove the file to start new "
                           "tracked runs") from exc
    return data if isinstance(data, dict) else {}
