"""Ctrl-C: the first saves and prints the command that resumes, the second stops at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bookgen.checkpoint.folder import MARKER
from tests.helpers import write_experiment
from tests.ranks import launch


def _start(exp: Path):
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.ranks import rank_env

    return subprocess.Popen([sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=rank_env())


def _wait_for_training(run: Path, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2:
            return
        time.sleep(0.05)
    raise AssertionError("training did not start")


@pytest.mark.multirank
def test_ctrl_c_saves_and_says_how_to_resume_and_twice_stops_at_once(tmp_path):
    import signal
    import time

    settings = {"train.max_steps": 500, "eval.at_end": False, "eval.samples": 0}
    exp = write_experiment(tmp_path / "once", settings, rows=120)
    proc = _start(exp)
    _wait_for_training(tmp_path / "once/run")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = int(err.split("interrupted: saved checkpoint at step ")[1].split(";")[0])
    assert f"resume with: bookgen train --cfg {exp}" in err.replace("\n", "")
    assert (tmp_path / f"once/run/checkpoints/step{step:08d}" / MARKER).is_file()
    assert not (tmp_path / "once/run/PREEMPTED").exists(), "a Ctrl-C is not a preemption: no requeue"
    assert (tmp_path / "once/run/INTERRUPTED").read_text() == f"{step}\n", "`bookgen runs` shows it interrupted"
    again = launch(1, ["--cfg", str(exp), "--set", f"train.max_steps={step + 2}"])
    assert f"at step {step}" in again.stderr
    assert not (tmp_path / "once/run/INTERRUPTED").exists(), "the resumed run finished"

    exp = write_experiment(tmp_path / "twice", settings, rows=120)
    proc = _start(exp)
    _wait_for_training(tmp_path / "twice/run")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped at once (second Ctrl-C)" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
