"""The run folder: one run at a time, never another run's checkpoints, mistakes named before any data work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from bookgen.checkpoint.folder import MARKER
from tests.helpers import REPO, run_cli, world_readable_tmp, write_experiment
from tests.ranks import launch, rank_env
from tests.runs import copy_trained_run


@pytest.mark.multirank
def test_a_new_run_never_meets_another_runs_checkpoints(trained, tmp_path):
    """`checkpoint.resume: never` (or a named checkpoint) in a run folder that holds other complete checkpoints
    is refused before anything is written. Before, the new run's save at a step the old run had saved kept the
    old weights, and an export of the 'finished' run held the earlier run's model."""
    exp = copy_trained_run(trained, tmp_path)
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    fresh = launch(1, ["--cfg", str(exp), "--set", "checkpoint.resume=never"], check=False)
    assert fresh.returncode == 2, fresh.stderr[-2000:]
    assert f"{run / 'checkpoints'} holds complete checkpoints from an earlier run" in fresh.stderr
    assert "step00000002, step00000004" in fresh.stderr and "run.output_dir" in fresh.stderr
    older = launch(1, ["--cfg", str(exp), "--set", f"checkpoint.resume={run / 'checkpoints/step00000002'}"],
                   check=False)
    assert older.returncode == 2, older.stderr[-2000:]
    assert "newer than step00000002, the checkpoint this run resumes from (step00000004)" in older.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "nothing was touched"
    # the ways out that the message names: another output folder (from scratch, or from the named checkpoint)
    elsewhere = launch(1, ["--cfg", str(exp), "--set", "checkpoint.resume=never",
                           "--set", f"run.output_dir={tmp_path / 'run2'}"])
    assert "resumed from" not in elsewhere.stderr
    branch = launch(1, ["--cfg", str(exp), "--set", f"checkpoint.resume={run / 'checkpoints/step00000002'}",
                        "--set", f"run.output_dir={tmp_path / 'run3'}"])
    assert "at step 2 (epoch" in branch.stderr, branch.stderr[-2000:]
    assert (tmp_path / "run3/checkpoints/step00000004" / MARKER).is_file()


@pytest.mark.multirank
def test_read_only_checkpoint_folder_is_refused_before_training(tmp_path):
    base = world_readable_tmp(tmp_path)
    try:
        exp = write_experiment(base, {"train.max_steps": 2}, rows=120)
        (base / "run" / "checkpoints").mkdir(parents=True)
        for folder in (base / "run", base):
            folder.chmod(0o777)
        (base / "run" / "checkpoints").chmod(0o555)
        proc = run_cli(["train", "--cfg", str(exp)], user=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"cannot write into {base / 'run' / 'checkpoints'}" in proc.stderr
        assert not (base / "run" / "prepared").exists(), "refused before preparing or training anything"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.multirank
def test_mistakes_that_need_no_data_are_reported_before_prepare(tmp_path):
    tiny = REPO / "experiments/tiny_cpu.yaml"
    out = tmp_path / "run"
    proc = run_cli(["train", "--cfg", str(tiny), "--set", f"run.output_dir={out}", "--set", "deepspeed.zero_stage=3"])
    assert proc.returncode == 2
    assert f"--set deepspeed.config={REPO / 'ds_configs/zero3.json'}" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "prepared").exists()
    exp = write_experiment(tmp_path / "resume", {"checkpoint.resume": "nowhere/step00000004"})
    proc = run_cli(["train", "--cfg", str(exp)])
    assert proc.returncode == 2 and "nowhere/step00000004 does not exist" in proc.stderr
    assert not (tmp_path / "resume/run/prepared").exists()


def test_a_second_run_into_a_busy_run_folder_is_refused(tmp_path):
    """The same command started twice: the second stops before it prepares or writes anything, naming the
    run that holds the folder; once that run ends (here: its lock is let go) the folder is free again."""
    import fcntl

    from bookgen.locks import LOCK_NAME

    exp = write_experiment(tmp_path, {"train.max_steps": 1, "eval.at_end": False}, rows=60)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_NAME, "a+", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, since 2026-11-27 12:00:00\n")
        held.flush()
        proc = run_cli(["train", "--cfg", str(exp)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{run}: another bookgen run is training into this folder (pid 4242 on elsewhere" in proc.stderr
        files = [p for p in run.rglob("*") if p.is_file()]
        assert files == [run / LOCK_NAME], f"nothing prepared, logged or saved: {files}"
    assert run_cli(["train", "--cfg", str(exp)]).returncode == 0
    assert (run / "checkpoints/step00000001" / MARKER).is_file()


@pytest.mark.multirank
def test_two_runs_of_the_same_command_do_not_share_a_folder(tmp_path):
    from bookgen.train.loop import STOP_FILE

    exp = write_experiment(tmp_path, {"train.max_steps": 10**6, "checkpoint.every": 10**6, "eval.at_end": False},
                           rows=120)
    first = subprocess.Popen([sys.executable, "-m", "bookgen.cli", "train", "--cfg", str(exp)], cwd=REPO,
                             env=rank_env({"PYTHONPATH": str(REPO)}), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    try:
        for _ in range(1200):  # the first run is training once it logs
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0:
                break
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = run_cli(["train", "--cfg", str(exp)])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another bookgen run is training into this folder (pid {first.pid} on " in second.stderr
    finally:
        (run / STOP_FILE).touch()  # the first run saves and stops, as under Slurm's time-limit warning
        _, err = first.communicate(timeout=600)
    assert first.returncode == 75, err[-2000:]
    saved = [p.name for p in (run / "checkpoints").glob("step*") if (p / MARKER).is_file()]
    assert len(saved) == 1, f"one run saved one checkpoint: {saved}"


def test_lock_and_log_files_never_write_through_a_planted_symbolic_link(tmp_path):
    """Anyone who can write into a shared prepared or run folder could plant a link at a fixed name; bookgen
    would have written `pid ... since ...` into the file it points at."""
    import os

    from bookgen.errors import BookgenError
    from bookgen.fileio import open_regular
    from bookgen.locks import PREPARE_LOCK_NAME, hold_prepared_folder
    from bookgen.tracking.metrics_log import MetricsLog

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / PREPARE_LOCK_NAME).symlink_to(notes)
    with pytest.raises(BookgenError, match=r"data.prepared_dir: cannot open .*\.prepare\.lock \(a symbolic link"):
        with hold_prepared_folder(prepared, print):
            pass
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(notes)
    with pytest.raises(OSError, match="a symbolic link"):
        MetricsLog(run)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OSError, match="not a regular file"):
        open_regular(tmp_path / "fifo", "a+")  # read-write: opening a FIFO does not wait for a reader
    assert notes.read_text() == "my notes\n"

    exp = write_experiment(tmp_path / "exp", {"train.max_steps": 1, "eval.at_end": False}, rows=60)
    (tmp_path / "exp" / "run").mkdir()
    (tmp_path / "exp" / "run" / ".bookgen-run.lock").symlink_to(notes)
    proc = run_cli(["train", "--cfg", str(exp)])
    assert proc.returncode == 2 and "a symbolic link, which bookgen does not follow" in proc.stderr, proc.stderr
    assert notes.read_text() == "my notes\n"


def test_resume_rewrites_metrics_aside_and_drops_a_torn_last_line(tmp_path, monkeypatch):
    """A kill during the rewrite left an empty metrics.jsonl; a kill mid-write leaves a partial last line,
    which made the resume raise JSONDecodeError."""
    import json
    import os

    from bookgen.tracking.metrics_log import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 6.0 - s}) for s in range(1, 11)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "loss": 5.9')
    said = []

    def killed(*args):
        raise KeyboardInterrupt  # as a kill between writing the shorter file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(run, resume_step=8, notify=said.append)
    assert (run / "metrics.jsonl").read_text().startswith(lines[0]), "the old file is whole"
    monkeypatch.undo()
    log = MetricsLog(run, resume_step=8, notify=said.append)
    log.write({"step": 9, "loss": 1.0})
    log.close()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert said and "dropped its last line, cut short" in said[0]
    assert not [p for p in run.iterdir() if p.name.startswith(".metrics")], "no scratch file left"


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    """Python leaves the file's name out of an error raised by a write on an open file."""
    import errno
    import os

    from bookgen.fileio import write_text_atomic
    from bookgen.tracking.metrics_log import MetricsLog

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*summary.json'"):
        write_text_atomic(tmp_path / "summary.json", "{}")
    log = MetricsLog(tmp_path / "run")
    monkeypatch.setattr(log, "_fh", type("Full", (), {"write": lambda self, text: full(0), "closed": True})())
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics.jsonl'"):
        log.write({"step": 1, "loss": 1.0})
    assert not list(tmp_path.glob(".summary.json*")), "no scratch file left"
