"""A real two-node Slurm cluster: sbatch matches torchrun, preemption and the time-limit warning requeue and
resume, a stale marker never requeues."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, write_experiment
from tests.ranks import rank_env, step_losses
from tests.runs import LAUNCH_SETTINGS


def _sbatch(exp: Path, log_dir: Path, *extra: str, wait: bool) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Submit; with ``wait``, the job's own exit status as the returncode, as `sbatch --wait` gives it. Its end
    is polled here every half second: `sbatch --wait` backs off to 32 s between polls, up to half a minute a
    test."""
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log_dir}/job-%j.out", "--nodes=2",
           str(REPO / "slurm" / "train.sh"), str(exp), *extra]
    env = rank_env({"BOOKGEN_PYTHON": sys.executable})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    job = int(re.match(r"\d+", proc.stdout.strip()).group()) if proc.stdout.strip() else -1
    if wait and proc.returncode == 0:
        _wait_for_end(job)
        out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
        proc.returncode = int(re.search(r" ExitCode=(\d+):", out).group(1))
    return job, proc


def _job_state(job: int) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


@pytest.mark.slurm
def test_sbatch_two_nodes_matches_torchrun(tmp_path, one_node):
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"train.max_steps": 3}, rows=120)
    job, proc = _sbatch(exp, tmp_path, "--set", "train.max_steps=5", wait=True)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    assert f"bookgen job {job} (restart 0): 2 nodes x 1 ranks" in log
    assert step_losses(tmp_path / "run") == pytest.approx(one_node, rel=1e-6), "--set after the file reached the ranks"


def _wait_for_step(run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(step_losses(run), default=0) >= step:
            return
        time.sleep(0.2)


def _wait_for_end(job: int, timeout: float = 400) -> str:
    """The job's final state. A requeued job starts again after the credential lifetime, which
    slurm/cluster.sh sets to 10 s (Slurm's default is 120 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(0.5)
    return _job_state(job)


def _interrupt_mid_run(tmp_path: Path, checkpoint_every: int, interrupts: list[tuple[int, list[str]]],
                       extra: dict | None = None) -> str:
    """Submit an 80-step job; for each (step, command), once the run has reached that step, run ``command
    JOBID``; let the job finish; return its log."""
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"train.max_steps": 80, "checkpoint.every": checkpoint_every}
                           | (extra or {}), rows=120)
    job, proc = _sbatch(exp, tmp_path, wait=False)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    for step, interrupt in interrupts:
        _wait_for_step(run, step)
        assert step <= max(step_losses(run), default=0) < 80, "the job must be mid-run when it is interrupted"
        subprocess.run([*interrupt, str(job)], check=True)
        time.sleep(1)
    state = _wait_for_end(job)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert sorted(step_losses(run)) == list(range(1, 81))
    return log


@pytest.mark.slurm
def test_time_limit_warning_and_a_requeue_by_hand_both_resume(tmp_path):
    """What `--signal=B:USR1@120` does before the time limit, sent by hand: save, requeue, resume. The resumed
    job then requeued by hand (`scontrol requeue`, no save) resumes from its newest checkpoint and completes.
    Also: the job appends to the MLflow run it started, each step once. (One job for both: a requeued job
    waits out Slurm's credential lifetime before it starts again.)"""
    store = tmp_path / "store"
    log = _interrupt_mid_run(tmp_path, 4, [(10, ["scancel", "--batch", "--signal=USR1"]),
                                           (30, ["scontrol", "requeue"])],
                             {"run.trackers": ["mlflow"], "run.mlflow.uri": str(store)})
    assert "stop requested by Slurm" in log and "requeueing job" in log and "(restart 1)" in log
    saved = int(re.search(r"preempted: saved checkpoint at step (\d+)", log).group(1))
    after_warning, after_requeue = log.split("(restart 1)")[1].split("(restart 2)")
    assert saved >= 10 and f"at step {saved}" in after_warning, "the requeued job resumed there"
    assert "resumed from" in after_requeue, "the job requeued by hand resumed from its newest checkpoint"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("bookgen").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(tracked.info.run_id, "loss")) == list(range(1, 81))
    assert tracked.info.status == "FINISHED"


@pytest.mark.slurm
def test_a_stale_preemption_marker_never_requeues_a_failing_job(tmp_path):
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"checkpoint.resume": "nowhere/step00000004"}, rows=120)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "PREEMPTED").write_text("12\n")  # left by an earlier job
    job, proc = _sbatch(exp, tmp_path, wait=True)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert proc.returncode == 2, proc.stderr + log[-3000:]
    assert "checkpoint.resume: " in log and "does not exist" in log
    assert "requeueing" not in log and "(restart 1)" not in log
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    assert "Restarts=0" in out and _job_state(job) == "FAILED"


@pytest.mark.slurm
def test_a_job_whose_plan_does_not_fit_stops_before_anything_is_prepared(tmp_path):
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"train.fit_check": True, "train.micro_batch_size": 100_000},
                           rows=120)
    job, proc = _sbatch(exp, tmp_path, wait=True)
    log = next(tmp_path.glob("job-*.out")).read_text()
    assert proc.returncode == 2, proc.stderr + log[-3000:]
    assert "DOES NOT FIT" in log and "it fits with train.micro_batch_size=" in log
    assert not (tmp_path / "run" / "prepared").exists() and "bookgen job" not in log  # no rank started


def test_train_sh_outside_slurm_says_so(tmp_path):
    """Run by hand instead of through sbatch: a sentence, not `SLURM_JOB_NODELIST: unbound variable`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "exp.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "slurm/train.sh: not inside a Slurm job; submit it: sbatch slurm/train.sh exp.yaml" in proc.stderr
    assert "unbound variable" not in proc.stderr
