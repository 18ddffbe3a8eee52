"""The launcher tests' reference (the experiment's losses on one node, made once per session), and whether a
Slurm cluster answers for the tests marked ``slurm``."""

from __future__ import annotations

import functools
import shutil
import subprocess

import pytest

from tests.helpers import write_experiment
from tests.ranks import launch, step_losses
from tests.runs import LAUNCH_SETTINGS


@pytest.fixture(scope="session")
def one_node(tmp_path_factory) -> dict[int, float]:
    """Losses of the same experiment on one node with 2 ranks (torchrun)."""
    folder = tmp_path_factory.mktemp("one_node")
    exp = write_experiment(folder, LAUNCH_SETTINGS, rows=120)
    launch(2, ["--cfg", str(exp)])
    return step_losses(folder / "run")


@functools.cache
def _slurm_missing() -> str | None:
    """None when a Slurm cluster answers, else why not. Asked once, at the first Slurm test (not at collection:
    `sinfo` waits 9 s for a controller that is not there, and `-m "not slurm"` runs none of them)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "Slurm is not installed on this machine (run `bash slurm/cluster.sh start` as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    nodes = sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.split()[1:] in (["idle"], ["mix"]))
    if out.returncode != 0 or nodes < 2:
        return f"no Slurm cluster with 2 idle nodes answers (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A Slurm test without a cluster is skipped with the reason, before its fixtures (one_node) run."""
    if item.get_closest_marker("slurm") is not None and (why := _slurm_missing()) is not None:
        pytest.skip(why)
