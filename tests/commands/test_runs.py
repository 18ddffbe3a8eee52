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
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_names_a_folder_that_holds_no_runs(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert f"{tmp_path}: neither a run folder" in capsys.readouterr().err.replace("\n", "")
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
