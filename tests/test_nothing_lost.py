"""Nothing lost, round two: reruns, resumes and the records a run leaves (issue 31)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bookgen.checkpoint.folder import MARKER
from bookgen.fileio import read_json
from bookgen.train.metrics import read_metrics
from tests.helpers import write_experiment
from tests.ranks import launch

STEPS = 6
SETTINGS = {"train.max_steps": STEPS, "checkpoint.every": 3, "checkpoint.keep": 3, "eval.every": 3,
            "eval.at_end": True, "eval.samples": 2, "generate.max_new_tokens": 8}


def _files(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("run_summary.json", "metrics.jsonl", "samples.jsonl")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished single-rank run with evaluations and samples at steps 3 and 6."""
    folder = tmp_path_factory.mktemp("finished")
    launch(1, ["--cfg", str(write_experiment(folder, SETTINGS, rows=120))])
    return folder


@pytest.mark.multirank
def test_rerunning_a_finished_run_changes_nothing(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, SETTINGS, rows=120)
    before = _files(tmp_path / "run")
    proc = launch(1, ["--cfg", str(exp)])
    assert "is a finished run (step 6 of 6): nothing was changed" in proc.stderr, proc.stderr[-2000:]
    assert _files(tmp_path / "run") == before
    summary = json.loads(before["run_summary.json"])  # valid JSON: no NaN
    assert summary["tokens"] > 0 and summary["train_loss"] > 0


@pytest.mark.multirank
def test_a_finished_run_given_more_steps_continues(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, SETTINGS | {"train.max_steps": STEPS + 2}, rows=120)
    launch(1, ["--cfg", str(exp)])
    steps = [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 3))
    assert read_json(tmp_path / "run/run_summary.json")["steps"] == STEPS + 2


@pytest.mark.multirank
def test_summary_of_a_resumed_run_covers_the_whole_run(finished, tmp_path):
    exp = write_experiment(tmp_path, SETTINGS, rows=120)
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


# --- damaged checkpoints: sizes, content and records checked before anything loads them -----------------

ZERO2 = {"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 2, "eval.at_end": False,
         "eval.samples": 0, "deepspeed.zero_stage": 2}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-2 run with complete checkpoints at steps 2 and 4."""
    from tests.helpers import REPO

    folder = tmp_path_factory.mktemp("zero2")
    exp = write_experiment(folder, ZERO2 | {"deepspeed.config": str(REPO / "ds_configs/zero2.json")}, rows=120)
    launch(2, ["--cfg", str(exp)])
    return folder


def _cli(args: list[str]):
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.ranks import rank_env

    return subprocess.run([sys.executable, "-m", "bookgen.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=rank_env())


def _copy(run: Path, tmp_path: Path, overrides: dict | None = None) -> Path:
    from tests.helpers import REPO

    shutil.copytree(run / "run", tmp_path / "run")
    return write_experiment(tmp_path, ZERO2 | {"deepspeed.config": str(REPO / "ds_configs/zero2.json")}
                            | (overrides or {}), rows=120)


def _zero_the_middle(path: Path, size: int) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - size // 2
    data[start:start + size] = bytes(size)
    path.write_bytes(bytes(data))


@pytest.mark.multirank
def test_content_damage_is_found_and_named_by_every_command(zero2_run, tmp_path):
    exp = _copy(zero2_run, tmp_path, {"train.max_steps": 6})
    step4 = tmp_path / "run/checkpoints/step00000004"
    record = read_json(step4 / MARKER)
    assert sorted(record["crc32"]) == sorted(record["files"]), "every file has its CRC-32"
    optimizer = sorted(step4.glob("*optim_states.pt"))[-1]  # rank 1's part
    size = optimizer.stat().st_size
    _zero_the_middle(optimizer, min(1 << 20, size // 4))
    assert optimizer.stat().st_size == size
    expected = f"{optimizer} has other content than was saved (CRC-32 differs): checkpoint step00000004 is damaged"
    resume = launch(2, ["--cfg", str(exp)], check=False)
    assert resume.returncode == 2 and expected in resume.stderr.replace("\n", ""), resume.stderr[-3000:]
    assert "step00000002" in resume.stderr
    for args in (["export", "--out", str(tmp_path / "hf")], ["eval", "--split", "valid"],
                 ["generate", "--max-new-tokens", "2", "--out", str(tmp_path / "g.jsonl")], ["samples"]):
        proc = _cli([args[0], "--cfg", str(exp), *args[1:]])
        assert proc.returncode == 2, (args, proc.stderr[-3000:])
        assert expected in proc.stderr.replace("\n", "") and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "g.jsonl").exists()


@pytest.mark.multirank
def test_a_checkpoint_record_without_its_keys_is_named(zero2_run, tmp_path):
    exp = _copy(zero2_run, tmp_path)
    step2 = tmp_path / "run/checkpoints/step00000002"
    (step2 / MARKER).write_text("{}")
    named = write_experiment(tmp_path / "other", ZERO2 | {"checkpoint.resume": str(step2)}, rows=120)
    proc = launch(1, ["--cfg", str(named)], check=False)
    assert proc.returncode == 2 and f"{step2 / MARKER}: not a bookgen checkpoint record" in \
        proc.stderr.replace("\n", ""), proc.stderr[-3000:]
    proc = _cli(["export", "--cfg", str(exp), "--checkpoint", str(step2), "--out", str(tmp_path / "hf")])
    assert proc.returncode == 2 and "not a bookgen checkpoint record" in proc.stderr and "Traceback" not in proc.stderr


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``folder``; None when it worked, else why not."""
    import os
    import subprocess

    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def _fill(folder: Path, leave_bytes: int) -> None:
    import os

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler.bin", "ab") as fh:
        fh.truncate(fh.tell() + max(free - leave_bytes, 0))
        fh.seek(0, 2)
        os.posix_fallocate(fh.fileno(), 0, fh.tell())


@pytest.mark.multirank
def test_a_real_full_disk_during_a_save_and_on_resume(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "25m")
    if why is not None:
        pytest.skip(why)
    try:
        exp = write_experiment(disk, {"train.max_steps": 4, "checkpoint.every": 2, "eval.at_end": False,
                                      "eval.samples": 0, "data.prepared_dir": str(tmp_path / "prepared")}, rows=120)
        first = launch(1, ["--cfg", str(exp), "--set", "train.max_steps=2"])  # a complete checkpoint at step 2
        assert first.returncode == 0
        size = sum(p.stat().st_size for p in (disk / "run/checkpoints/step00000002").rglob("*") if p.is_file())
        _fill(disk, size // 3)  # room for a third of the next checkpoint
        proc = launch(1, ["--cfg", str(exp)], check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "cannot write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
        assert "Traceback" not in proc.stderr and "Earlier checkpoints are untouched" in proc.stderr
        assert (disk / "run/checkpoints/step00000002" / MARKER).is_file()
        assert not (disk / "run/checkpoints/step00000004" / MARKER).exists()
        _fill(disk, 0)
        proc = launch(1, ["--cfg", str(exp)], check=False)
        assert proc.returncode == 2 and "No space left on device" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        (disk / "filler.bin").unlink()  # space again: the same command resumes from step 2 and finishes
        proc = launch(1, ["--cfg", str(exp)])
        assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
        assert (disk / "run/checkpoints/step00000004" / MARKER).is_file()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- Ctrl-C and the commands a run prints -----------------------------------------------------------------

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
    again = launch(1, ["--cfg", str(exp), "--set", f"train.max_steps={step + 2}"])
    assert f"at step {step}" in again.stderr

    exp = write_experiment(tmp_path / "twice", settings, rows=120)
    proc = _start(exp)
    _wait_for_training(tmp_path / "twice/run")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped at once (second Ctrl-C)" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.multirank
def test_the_printed_export_command_runs_as_printed(finished, tmp_path):
    import shlex

    shutil.copytree(finished / "run", tmp_path / "run")
    exp = write_experiment(tmp_path, SETTINGS | {"train.max_steps": STEPS + 1}, rows=120)
    proc = _cli(["train", "--cfg", str(exp), "--set", "eval.samples=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("export it: "))
    command = shlex.split(line.removeprefix("export it: "))
    assert command[:4] == ["bookgen", "export", "--cfg", str(exp)] and "--set=eval.samples=0" in command
    out = _cli(command[1:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run-hf" / "config.json").is_file()
