"""`bookgen runs`: run folders in one table with the right status, and their validation curves on one chart."""

from __future__ import annotations

import fcntl
import shutil

import pytest

from bookgen.cli import main
from tests.helpers import run_cli
from tests.runs import FINISHED_STEPS


def _row(stdout: str, name: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if f" {name} " in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]


@pytest.mark.multirank  # the shared finished run trains once per session
def test_runs_table_shows_each_status_and_plots_the_curves(finished, tmp_path):
    runs = tmp_path / "runs"
    names = ("done", "preempted", "interrupted", "failed", "running")
    for name in names:
        shutil.copytree(finished / "run", runs / name)
    for name in names[1:]:  # ended before their summary was written
        (runs / name / "run_summary.json").unlink()
    (runs / "preempted" / "PREEMPTED").write_text("6\n")
    (runs / "interrupted" / "INTERRUPTED").write_text("6\n")
    with open(runs / "running" / ".bookgen-run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training run holds it
        proc = run_cli(["runs", str(runs), "--plot", str(tmp_path / "curves.png")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    status = {name: _row(proc.stdout, f"runs/{name}")[-1] for name in names}
    assert status == {"done": "finished", "preempted": "preempted", "interrupted": "interrupted", "failed": "failed",
                      "running": "running"}
    done = _row(proc.stdout, "runs/done")
    assert done[1] == "exp.yaml" and done[3] == "none" and done[5] == "1", "experiment, packing, ranks"
    assert done[6] == str(FINISHED_STEPS)
    assert float(done[8]) <= float(done[9]), "best perplexity <= last"
    planned, measured = (float(v.replace(",", "")) for v in done[-3].split("/"))
    assert done[-2].startswith("-/") and float(done[-2].split("/")[1]) > 0, "no planned step time on a CPU"
    assert measured == pytest.approx(planned, rel=0.5), "the peak MiB a rank, planned and measured"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_names_a_folder_that_holds_no_runs(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert f"{tmp_path}: neither a run folder" in capsys.readouterr().err.replace("\n", "")
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def _bare_run(folder, metrics: str):
    folder.mkdir(parents=True)
    (folder / "resolved_config.yaml").write_text("data: {packing: none}\n")
    (folder / "metrics.jsonl").write_text(metrics)


def test_a_torn_or_damaged_metrics_file_marks_its_run_and_the_others_are_listed(tmp_path, capsys, monkeypatch):
    good = '{"step": 1, "loss": 6.0}\n{"step": 2, "eval_loss": 5.5, "perplexity": 244.7, "rougeL": 0.25}\n'
    _bare_run(tmp_path / "runs" / "good", good)
    _bare_run(tmp_path / "runs" / "torn", good + '{"step": 3, "loss": 5.9')
    _bare_run(tmp_path / "runs" / "damaged", '{"step": 1\n' + good)
    monkeypatch.chdir(tmp_path)
    assert main(["runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert _row(out, "runs/good")[-1] == "failed" and _row(out, "runs/good")[-4] == "0.250", "ROUGE-L"
    assert _row(out, "runs/good")[-3] == _row(out, "runs/good")[-2] == "-/-", "no plan recorded"
    assert _row(out, "runs/torn")[-1] == "failed, last line torn"
    assert _row(out, "runs/torn")[6] == "1", "the torn step is not counted"
    assert "metrics.jsonl unreadable (line 1" in _row(out, "runs/damaged")[-1]


def test_plot_targets_are_checked_before_anything_is_read(tmp_path, capsys):
    good = '{"step": 1, "loss": 6.0}\n{"step": 2, "eval_loss": 5.5, "perplexity": 244.7}\n'
    _bare_run(tmp_path / "runs" / "good", good)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("run: {}\n")
    for target, message in ((tmp_path / "runs", "a folder; name the image to write"),
                            (experiment, "matplotlib cannot write '.yaml' images"),
                            (tmp_path / "missing" / "c.png", "the folder " + str(tmp_path / "missing"))):
        assert main(["runs", str(tmp_path / "runs"), "--plot", str(target)]) == 2
        assert message in capsys.readouterr().err.replace("\n", ""), target
    assert experiment.read_text() == "run: {}\n"
    assert main(["runs", str(tmp_path / "runs"), "--plot", str(tmp_path / "curves")]) == 0
    assert f"validation curves: {tmp_path / 'curves.png'}" in capsys.readouterr().err.replace("\n", "")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
