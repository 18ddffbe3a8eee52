"""The GPU pipeline check runs its every stage on the CPU (`--tiny`), so it cannot rot between device loans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.ranks import rank_env


@pytest.mark.multirank
def test_gpu_pipeline_tiny_passes_every_stage_on_cpu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_pipeline.sh"), "--tiny", "--folder", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=rank_env({"PYTHON": sys.executable}))
    record = json.loads((tmp_path / "pipeline.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == ["prepare", "train_zero2", "train_zero3", "resume", "eval", "export", "cpu_reference",
                            "generate", "throughput"]
    failed = {name: s["detail"] for name, s in stages.items() if not s["passed"]}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert stages["resume"]["numbers"]["max_rel_diff_steps_trained_twice"] == 0.0, "bit-exact on the CPU"
    assert stages["cpu_reference"]["numbers"]["rel_diff"] < 1e-5
    assert "9/9 stages passed on cpu" in proc.stdout
