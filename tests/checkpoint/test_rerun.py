"""Reruns of a finished run: nothing changes unless there is more to train, and the records (summary, metrics,
samples, each checkpoint's evaluation) cover the whole run across resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bookgen.checkpoint.folder import MARKER
from bookgen.fileio import read_json
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import write_experiment
from tests.ranks import launch
from tests.runs import FINISHED_SETTINGS, FINISHED_STEPS, copy_trained_run


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("run_summary.json", "metrics.jsonl", "samples.jsonl")}


@pytest.mark.multirank
def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, FINISHED_SETTINGS, rows=120)
    before = _files(tmp_path / "run")
    proc = launch(1, ["--cfg", str(exp)])
    assert "is a finished run (step 6 of 6): nothing was changed" in proc.stderr, proc.stderr[-2000:]
    assert _files(tmp_path / "run") == before
    summary = json.loads(before["run_summary.json"])  # valid JSON: no NaN
    assert summary["tokens"] > 0 and summary["train_loss"] > 0


@pytest.mark.multirank
def test_a_finished_run_given_more_steps_continues(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, FINISHED_SETTINGS | {"train.max_steps": FINISHED_STEPS + 2}, rows=120)
    launch(1, ["--cfg", str(exp)])
    steps = [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, FINISHED_STEPS + 3))
    assert read_json(tmp_path / "run/run_summary.json")["steps"] == FINISHED_STEPS + 2


@pytest.mark.multirank
def test_summary_of_a_resumed_run_covers_the_whole_run(finished, tmp_path):
    exp = write_experiment(tmp_path, FINISHED_SETTINGS, rows=120)
    killed = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill:4"}, check=False)
    assert killed.returncode != 0
    launch(1, ["--cfg", str(exp)])
    whole, resumed = read_json(finished / "run/run_summary.json"), read_json(tmp_path / "run/run_summary.json")
    assert resumed["tokens"] == whole["tokens"], "the summary counts the part before the resume too"
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    assert resumed["seconds"] > 0


@pytest.mark.multirank
def test_each_checkpoint_records_its_own_steps_evaluation(finished):
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(finished / "run/metrics.jsonl") if "eval_loss" in r}
    assert sorted(evals) == [3, 6], "one evaluation per due step, the last one not twice"
    for step in (3, 6):
        marker = read_json(finished / f"run/checkpoints/step{step:08d}" / MARKER)
        assert marker["eval_loss"] == pytest.approx(evals[step])
        assert marker["state"]["best_eval_loss"] == pytest.approx(min(v for s, v in evals.items() if s <= step))
    samples = [json.loads(line)["step"] for line in (finished / "run/samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == [3, 6] and len(samples) == 4


@pytest.mark.multirank
def test_rerunning_a_finished_run_keeps_its_checkpoint(trained, tmp_path):
    exp = copy_trained_run(trained, tmp_path)
    final = tmp_path / "run/checkpoints/step00000004"
    stamp = (final / MARKER).stat().st_mtime_ns
    # a kill inside a save of step 4 would, before, have left no checkpoint at all
    proc = launch(1, ["--cfg", str(exp)], env={"BOOKGEN_FAULT": "kill_in_save:4"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (final / MARKER).stat().st_mtime_ns == stamp, "the complete final checkpoint was not saved again"
    assert "is a finished run (step 4 of 4): nothing was changed" in proc.stderr
