"""run.trackers: TensorBoard, W&B (offline) and MLflow (a local store) receive what the run logs, once per
step, across a kill and a resume; a tracker that breaks mid-run is dropped with one warning; a missing
package is named before any data is touched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import REPO, write_experiment
from tests.ranks import launch, rank_env
from tests.tracking import wandb_records

ALL = ["tensorboard", "wandb", "mlflow"]
STEPS = 10


def tensorboard_steps(folder: Path) -> Counter[tuple[str, int]]:
    """(tag, step) of every scalar and text in a TensorBoard folder's event files, counted."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen: Counter[tuple[str, int]] = Counter()
    for events in sorted(folder.glob("events.out.tfevents*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                seen[(value.tag.removesuffix("/text_summary"), event.step)] += 1
    return seen


def mlflow_run(store: Path):  # noqa: ANN201 - an mlflow Run
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bookgen")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "a resumed run appends to the tracked run it started"
    return client, runs[0]


@pytest.mark.multirank
def test_trackers_follow_a_killed_preempted_and_resumed_run(tmp_path):
    """Killed at step 5 (logged up to 4, saved at 3), then preempted at 7 (saved at the log step 8), then
    finished: the first resume re-trains 4 and 5 but sends step 4's numbers, evaluation and samples to no
    tracker twice; each tracker keeps one run over the three attempts."""
    exp = write_experiment(tmp_path, {
        "train.max_steps": STEPS, "run.log_every": 2, "eval.every": 4, "eval.at_end": True, "eval.samples": 2,
        "generate.max_new_tokens": 8, "checkpoint.every": 3, "run.trackers": ALL,
        "run.mlflow.uri": str(tmp_path / "store"), "deepspeed.zero_stage": 2,
        "deepspeed.config": str(REPO / "ds_configs/zero2.json")}, rows=120)
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = launch(2, ["--cfg", str(exp)], env=env | {"BOOKGEN_FAULT": "kill:5:0"}, check=False, timeout=120)
    assert killed.returncode != 0
    preempted = launch(2, ["--cfg", str(exp)], env=env | {"BOOKGEN_FAULT": "sigusr1:7:1"}, check=False, timeout=120)
    assert preempted.returncode == 75, preempted.stderr[-3000:]
    launch(2, ["--cfg", str(exp)], env=env)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    evaluated = [4, STEPS]  # the preemption at step 8's log step saves before that step's evaluation

    client, tracked = mlflow_run(tmp_path / "store")
    assert tracked.info.status == "FINISHED"
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), "each step once"
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    for key in ("eval_loss", "perplexity", "samples_stop_rate"):
        assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, key)) == evaluated, key
    rates = client.get_metric_history(tracked.info.run_id, "tokens_per_second")
    assert sorted(m.step for m in rates) == [2, 3, 4, 6, 8, 9, 10], "log steps: every 2nd, the checkpoints (3, 9)"
    params = tracked.data.params
    assert params["experiment.train.max_steps"] == str(STEPS) and params["world_size"] == "2"
    assert params["deepspeed.zero_optimization.stage"] == "2" and params["bookgen_version"]
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"eval_results.json", "loss_curves.png", "samples.jsonl", "samples"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "samples")] == [
        f"samples/step_{step:08d}.json" for step in evaluated]

    seen = tensorboard_steps(run / "tensorboard")
    assert sorted(step for (tag, step) in seen if tag == "loss") == list(range(1, STEPS + 1))
    assert max(seen.values()) == 1, "nothing sent twice"
    assert sorted(step for (tag, step) in seen if tag == "samples") == evaluated

    # W&B keeps up to 15 s of records in memory before its .wandb file: the killed attempt's are lost (its
    # file holds the header alone); the preempted attempt ends its W&B run and the last one reopens it
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and len({f.name for f in files}) == 1, "three attempts, one W&B run id"
    rows = [row for f in files for row in wandb_records.history(f)]
    assert sorted(r["_step"] for r in rows if "loss" in r) == list(range(5, STEPS + 1))
    assert sorted(r["_step"] for r in rows if "eval_loss" in r) == [STEPS]
    assert sorted(r["_step"] for r in rows if r.get("samples/_type") == "table-file") == [STEPS]
    config = wandb_records.config(files[-1])
    assert config["world_size"] == 2 and config["experiment"]["train"]["max_steps"] == STEPS
    assert any(name.endswith("-results") for name in wandb_records.artifact_names(files[-1]))


@pytest.mark.multirank
def test_a_tracker_failing_mid_run_warns_once_and_the_run_finishes(tmp_path):
    exp = write_experiment(tmp_path, {"train.max_steps": 4, "run.log_every": 1,
                                      "run.trackers": ["tensorboard", "mlflow"],
                                      "run.mlflow.uri": str(tmp_path / "store")}, rows=120)
    proc = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "tracker:2"})
    for name in ("tensorboard", "mlflow"):
        assert proc.stderr.count(f"the {name} tracker failed") == 1, proc.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    client, tracked = mlflow_run(tmp_path / "store")
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")] == [1]
    assert tracked.info.status == "FAILED", "the dropped tracker's run is ended as failed"
    assert (tmp_path / "run" / "run_summary.json").is_file()


def test_a_missing_tracker_package_is_named_before_any_data_is_touched(tmp_path):
    exp = write_experiment(tmp_path, {"run.trackers": ["mlflow"]}, rows=120)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None  # as if not installed\n")
    proc = subprocess.run([sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=rank_env({"PYTHONPATH": os.pathsep.join([str(hide), str(REPO)])}))
    assert proc.returncode == 2
    assert "run.trackers: mlflow needs the mlflow package" in proc.stderr
    assert "pip install 'bookgen[mlflow]'" in proc.stderr
    assert not (tmp_path / "run" / "prepared").exists(), "nothing prepared"


@pytest.mark.multirank
def test_a_tracker_that_cannot_start_stops_the_run_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    exp = write_experiment(tmp_path, {"run.trackers": ["mlflow"], "run.mlflow.uri": str(tmp_path / "a-file" / "store")},
                           rows=120)
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run.trackers: mlflow could not start" in proc.stderr and "a-file" in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoints/step*")), "nothing trained, nothing saved"
    assert not (tmp_path / "run" / "trackers.json").exists()


@pytest.mark.multirank
def test_an_mlflow_server_that_does_not_answer_is_named_before_any_data_is_touched(tmp_path):
    """MLflow's client retried an unreachable server silently for 253 s, after the data was prepared. Here: a
    port that refuses (on 2 ranks: rank 0 checks, every rank stops), and a server that accepts but never answers."""
    import socket
    import time

    from bookgen.config_io import load_config
    from bookgen.errors import BookgenError
    from bookgen.tracking import check_tracker_servers
    from tests.ranks import free_port

    exp = write_experiment(tmp_path, {"run.trackers": ["mlflow"],
                                      "run.mlflow.uri": f"http://127.0.0.1:{free_port()}"}, rows=120)
    proc = launch(2, ["--cfg", str(exp)], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "run.mlflow.uri: the MLflow server at http://127.0.0.1:" in proc.stderr
    assert "does not answer" in proc.stderr
    assert not (tmp_path / "run" / "prepared").exists(), "nothing prepared"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cfg = load_config(exp, [f"run.mlflow.uri=http://127.0.0.1:{silent.getsockname()[1]}"])
        start = time.perf_counter()
        with pytest.raises(BookgenError, match=r"does not answer \(timed out; waited at most 1 s\)"):
            check_tracker_servers(cfg.run, timeout_s=1.0)
        assert time.perf_counter() - start < 10
