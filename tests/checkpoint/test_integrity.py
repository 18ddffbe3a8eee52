"""Damaged checkpoints and full disks: every file's checksum is checked before a load, the damaged file is
named, and a full disk never costs the previous complete checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bookgen.checkpoint.folder import MARKER
from bookgen.cli import main
from bookgen.fileio import read_json
from tests.helpers import REPO, run_cli, write_experiment
from tests.ranks import launch
from tests.runs import copy_trained_run

ZERO2 = {"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.keep": 2, "eval.at_end": False,
         "eval.samples": 0, "deepspeed.zero_stage": 2}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-2 run with complete checkpoints at steps 2 and 4."""

    folder = tmp_path_factory.mktemp("zero2")
    exp = write_experiment(folder, ZERO2 | {"deepspeed.config": str(REPO / "ds_configs/zero2.json")}, rows=120)
    launch(2, ["--cfg", str(exp)])
    return folder


def _copy(run: Path, tmp_path: Path, overrides: dict | None = None) -> Path:

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
        proc = run_cli([args[0], "--cfg", str(exp), *args[1:]])
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
    proc = run_cli(["export", "--cfg", str(exp), "--checkpoint", str(step2), "--out", str(tmp_path / "hf")])
    assert proc.returncode == 2 and "not a bookgen checkpoint record" in proc.stderr and "Traceback" not in proc.stderr


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a small tmpfs at ``folder``; None when it worked, else why not."""
    import subprocess

    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def _fill(folder: Path, leave_bytes: int) -> None:

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler.bin", "ab") as fh:
        fh.truncate(fh.tell() + max(free - leave_bytes, 0))
        fh.seek(0, 2)
        os.posix_fallocate(fh.fileno(), 0, fh.tell())


@pytest.mark.multirank
def test_a_real_full_disk_during_a_save_and_on_resume(tmp_path):

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


@pytest.mark.multirank
def test_truncated_checkpoint_file_is_named_with_the_previous_checkpoint(trained, tmp_path):
    exp = copy_trained_run(trained, tmp_path, {"train.max_steps": 6})
    damaged = tmp_path / "run/checkpoints/step00000004/mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    proc = launch(1, ["--cfg", str(exp)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(damaged) in proc.stderr and "step00000002" in proc.stderr
    assert "checkpoint.resume=" in proc.stderr
    # the hint's first way: the damaged checkpoint moved out, the same command resumes from step 2 and saves
    # step 4 anew (before, resuming from step 2 reached step 4 and kept the damaged copy as the newest)
    shutil.move(damaged.parent, tmp_path / "damaged_step4")
    again = launch(1, ["--cfg", str(exp)])
    assert "at step 2 (epoch" in again.stderr, again.stderr[-2000:]
    assert (tmp_path / "run/checkpoints/step00000004" / MARKER).is_file()
    assert main(["eval", "--cfg", str(exp), "--split", "valid"]) == 0
