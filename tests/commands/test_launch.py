"""Launching: command construction, torchrun across two "nodes", the deepspeed launcher, the ranks' own exit
status."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bookgen.cli import main
from bookgen.commands.launch import launch_command
from bookgen.config_io import load_config
from bookgen.tracking.metrics_log import read_metrics
from tests.helpers import REPO, run_cli, write_experiment
from tests.ranks import free_port, rank_env, step_losses
from tests.runs import LAUNCH_SETTINGS


def test_dry_run_commands(tmp_path, capsys):
    from bookgen.cli import main

    exp = write_experiment(tmp_path, {"launch.backend": "slurm", "launch.nodes": 4, "launch.procs_per_node": 8,
                                      "launch.partition": "gpu", "launch.time": "12:00:00", "launch.gpus_per_node": 8,
                                      "launch.sbatch_extra": ["--qos=high"]})
    assert main(["launch", "--cfg", str(exp), "--dry-run", "--set", "train.max_steps=10"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("sbatch --nodes=4 --ntasks-per-node=1 --export=ALL,BOOKGEN_NPROC_PER_NODE=8")
    assert "--partition=gpu --time=12:00:00 --gpus-per-node=8 --qos=high" in out
    assert out.endswith(f"slurm/train.sh {exp} --set=train.max_steps=10")
    (tmp_path / "hosts").write_text("node1 slots=8\nnode2 slots=8\n")
    cfg = load_config(exp, ["launch.backend=deepspeed", "launch.nodes=2", "launch.hostfile=hosts"])
    ds = launch_command(cfg.launch, exp, [])
    assert ds[:5] == ["deepspeed", "--num_nodes", "2", "--num_gpus", "8"] and str(tmp_path / "hosts") in ds
    cfg = load_config(exp, ["launch.backend=torchrun", "launch.nodes=2", "launch.node_rank=1"])
    tr = " ".join(launch_command(cfg.launch, exp, []))
    assert "--nnodes 2 --nproc_per_node 8 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:29500" in tr


@pytest.mark.multirank
def test_torchrun_across_two_nodes_matches_one_node(tmp_path, one_node):
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"launch.nodes": 2, "launch.master_port": free_port()}, rows=120)
    procs = []
    for node_rank in (0, 1):
        cmd = launch_command(load_config(exp, [f"launch.node_rank={node_rank}"]).launch, exp, [])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0] + outputs[1]
    assert step_losses(tmp_path / "run") == pytest.approx(one_node, rel=1e-6)


@pytest.mark.multirank
def test_deepspeed_launcher_matches_torchrun(tmp_path, one_node):
    if shutil.which("deepspeed") is None and not (Path(sys.executable).parent / "deepspeed").exists():
        pytest.skip("the deepspeed launcher is not on PATH")
    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {"launch.backend": "deepspeed", "launch.procs_per_node": 2,
                                                 "launch.master_port": free_port()}, rows=120)
    cmd = launch_command(load_config(exp).launch, exp, [])
    cmd[0] = str(Path(sys.executable).parent / "deepspeed")
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_losses(tmp_path / "run") == pytest.approx(one_node, rel=1e-6)


@pytest.mark.multirank
def test_launch_ends_with_the_ranks_own_status_and_no_traceback(tmp_path):
    exp = write_experiment(tmp_path, {"checkpoint.resume": "nowhere/step00000004", "launch.procs_per_node": 2,
                                      "launch.master_port": free_port()})
    proc = subprocess.run([sys.executable, "-m", "bookgen.cli", "launch", "--cfg", str(exp)], cwd=REPO,
                          capture_output=True, text=True, env=rank_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not exist" in proc.stderr
    assert re.search(r"bookgen: rank [01] exited with status 2", proc.stderr), "the first rank to fail, by name"
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_launcher_mode_without_a_value(tmp_path):
    exp = write_experiment(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "launcher/run.py"), "--cfg", str(exp), "--mode"],
                          capture_output=True, text=True, env=rank_env())
    assert proc.returncode == 2 and "--mode needs one of train, eval, generate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_warns_that_other_nodes_cannot_reach_loopback(tmp_path, capsys):
    exp = write_experiment(tmp_path, {"launch.nodes": 2})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert "other nodes cannot reach a loopback address" in capsys.readouterr().err
    exp = write_experiment(tmp_path / "ok", {"launch.nodes": 2, "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert "loopback" not in capsys.readouterr().err
    assert yaml  # experiments are YAML files


def test_deepspeed_launch_on_several_nodes_needs_a_hostfile(tmp_path, capsys):
    exp = write_experiment(tmp_path, {"launch.nodes": 2, "launch.backend": "deepspeed",
                                      "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 2
    assert "launch.hostfile: the deepspeed launcher needs a hostfile to start 2 nodes" in capsys.readouterr().err
    exp = write_experiment(tmp_path, {"launch.nodes": 2, "launch.backend": "deepspeed", "launch.hostfile": "hosts",
                                      "launch.master_addr": "node1"})
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 2
    assert f"launch.hostfile: {tmp_path / 'hosts'} does not exist" in capsys.readouterr().err.replace("\n", "")
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    assert main(["launch", "--cfg", str(exp), "--dry-run"]) == 0
    assert f"--hostfile {tmp_path / 'hosts'}" in capsys.readouterr().out


def test_ranks_start_with_a_fixed_malloc_threshold_unless_the_user_set_one():
    from bookgen.commands.launch import rank_environment

    assert rank_environment({"PATH": "/bin"}) == {"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    assert rank_environment({"MALLOC_MMAP_THRESHOLD_": "65536"})["MALLOC_MMAP_THRESHOLD_"] == "65536"


@pytest.mark.multirank
def test_a_killed_rank_is_restarted_and_the_run_completes_from_its_checkpoint(tmp_path, one_node):
    """`bookgen launch` passes launch.max_restarts to torchrun (c10d rendezvous): rank 1 killed after step 4
    restarts both ranks, the run resumes from step 3 and ends as the uninterrupted run does; no step is logged
    twice and the tracker keeps one run. A user error is not restarted: it is printed once."""
    from tests.tracking.test_trackers import mlflow_run

    exp = write_experiment(tmp_path, LAUNCH_SETTINGS | {
        "launch.procs_per_node": 2, "launch.max_restarts": 1, "checkpoint.every": 3, "run.trackers": ["mlflow"],
        "run.mlflow.uri": str(tmp_path / "store")}, rows=120)
    proc = subprocess.run([sys.executable, "-m", "bookgen.cli", "launch", "--cfg", str(exp)], cwd=REPO,
                          capture_output=True, text=True, env=rank_env({"BOOKGEN_FAULT": "kill:4:1"}), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5], "nothing logged twice"
    assert step_losses(tmp_path / "run") == pytest.approx(one_node, rel=1e-6)
    client, tracked = mlflow_run(tmp_path / "store")
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")] == [1, 2, 3, 4, 5]

    bad = write_experiment(tmp_path / "bad", {"checkpoint.resume": "nowhere/step00000004",
                                              "launch.procs_per_node": 2, "launch.max_restarts": 2})
    proc = subprocess.run([sys.executable, "-m", "bookgen.cli", "launch", "--cfg", str(bad)], cwd=REPO,
                          capture_output=True, text=True, env=rank_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("does not exist") == 2, "one error line per rank, from the first attempt only"
    assert "not restarted: the previous attempt stopped on an error" in proc.stderr


def test_a_restart_repeats_no_deliberate_stop_but_heals_a_crash(tmp_path):
    """What bookgen's torchrun wrapper leaves for restarted ranks: an error, a preemption or a Ctrl-C is kept
    (the restarted ranks end with it at once), a crash or a kill is not (they resume)."""
    from bookgen.restart_guard import GUARD_VARIABLE, record, repeated_status

    first = {GUARD_VARIABLE: str(tmp_path), "TORCHELASTIC_RESTART_COUNT": "0"}
    again = first | {"TORCHELASTIC_RESTART_COUNT": "1"}
    record(1, first)  # an uncaught exception
    record(137, first)  # SIGKILL
    assert repeated_status(again) is None, "a crash heals by restarting"
    record(75, first)
    assert repeated_status(again) == 75 and repeated_status(first) is None, "only restarted ranks repeat it"
    assert repeated_status({"TORCHELASTIC_RESTART_COUNT": "1"}) is None, "plain torchrun: no guard"


def test_a_slurm_job_that_will_not_fit_its_gpus_is_not_submitted(tmp_path):
    """launch.gpu_memory names the cluster's GPUs: `bookgen launch` checks the plan before the queue."""
    too_big = {"model.config": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
                                "intermediate_size": 11008, "num_attention_heads": 32, "max_position_embeddings": 64},
               "train.precision": "bf16", "deepspeed.zero_stage": 3,
               "deepspeed.config": str(REPO / "ds_configs/zero3.json"), "launch.backend": "slurm",
               "launch.gpus_per_node": 1, "launch.gpu_memory": "24GB"}
    exp = write_experiment(tmp_path, too_big)
    proc = run_cli(["launch", "--cfg", str(exp)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the largest part is optimizer" in proc.stderr and "it fits with" in proc.stderr
    assert "sbatch" not in proc.stdout, "nothing submitted"
    cfg = load_config(exp)
    from bookgen.commands.launch import plan_check_command

    check = plan_check_command(cfg.launch, exp, ["train.max_steps=3"])
    assert "--set=train.max_steps=3" in check and check[check.index("--gpu-memory") + 1] == "24GB"
    assert plan_check_command(load_config(exp, ["launch.gpu_memory=null"]).launch, exp, []) is None, "checked at start"
