"""`bookgen launch`: turn the experiment's `launch` section into the torchrun, deepspeed or sbatch command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bookgen.config import LaunchConfig
from bookgen.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # bookgen/commands/launch.py -> the checkout
RUN = REPO / "launcher" / "run.py"
SBATCH_SCRIPT = REPO / "slurm" / "train.sh"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


# glibc serves allocations below a threshold from its heap and raises the threshold to the size of each large
# block freed, up to 32 MB; the tensors a ZeRO-3 build creates whole and frees after partitioning then stay in
# the heap as fragments. A fixed 4 MB threshold returns them: bench/memory_scaling.py measured a rank's peak while
# loading a 251 MB model on 2 ranks at 417 MB without it, 190 MB with it, and its training peak 2,200 -> 1,584 MB.
RANK_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


def rank_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to start ranks with: ``base`` (default this process's) plus :data:`RANK_ENVIRONMENT` where
    the user has not set those variables."""
    env = dict(os.environ if base is None else base)
    for key, value in RANK_ENVIRONMENT.items():
        env.setdefault(key, value)
    return env


def launch_warnings(la: LaunchConfig) -> list[str]:
    """What would make the launched job hang rather than fail."""
    if la.nodes > 1 and la.backend != "slurm" and la.master_addr in LOOPBACK:
        return [f"launch.nodes is {la.nodes} but launch.master_addr is {la.master_addr}: the other nodes cannot "
                "reach a loopback address, and they wait for the rendezvous until they time out; set "
                "launch.master_addr to the first node's hostname or IP"]
    return []


def plan_check_command(la: LaunchConfig, cfg_path: Path, overrides: list[str]) -> list[str] | None:
    """The arguments of `bookgen plan --check` for the cluster's GPUs, run before sbatch: for a Slurm GPU job
    whose GPUs' memory the launch section names (launch.gpu_memory); None otherwise (the job checks when it
    starts)."""
    if la.backend != "slurm" or not la.gpus_per_node or la.gpu_memory is None:
        return None
    return ["plan", "--cfg", str(cfg_path), *(f"--set={o}" for o in overrides), "--check",
            "--nodes", str(la.nodes), "--gpus", str(la.gpus_per_node), "--gpu-memory", str(la.gpu_memory)]


def launch_command(la: LaunchConfig, cfg_path: Path, overrides: list[str]) -> list[str]:
    args = ["--cfg", str(cfg_path), *(f"--set={o}" for o in overrides)]
    if la.backend == "torchrun":
        cmd = [sys.executable, "-m", "bookgen.commands.torchrun", "--nnodes", str(la.nodes),
               "--nproc_per_node", str(la.procs_per_node)]
        if la.nodes == 1:
            cmd.append("--standalone")
        else:
            cmd += ["--node_rank", str(la.node_rank), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"{la.master_addr}:{la.master_port}", "--rdzv_id", "bookgen"]
        return [*cmd, "--max-restarts", str(la.max_restarts), str(RUN), *args]
    if la.backend == "deepspeed":
        if la.nodes > 1 and la.hostfile is None:
            raise ConfigError(f"launch.hostfile: the deepspeed launcher needs a hostfile to start {la.nodes} nodes "
                              "(one line per node: `hostname slots=N`); set launch.hostfile, or use "
                              "launch.backend: torchrun or slurm")
        if la.hostfile is not None and not la.hostfile.is_file():
            raise ConfigError(f"launch.hostfile: {la.hostfile} does not exist")
        cmd = ["deepspeed", "--num_nodes", str(la.nodes), "--num_gpus", str(la.procs_per_node),
               "--master_addr", la.master_addr, "--master_port", str(la.master_port)]
        if la.hostfile is not None:
            cmd += ["--hostfile", str(la.hostfile)]
        return [*cmd, str(RUN), *args]
    cmd = ["sbatch", f"--nodes={la.nodes}", "--ntasks-per-node=1",
           f"--export=ALL,BOOKGEN_NPROC_PER_NODE={la.procs_per_node}"]
    if la.partition:
        cmd.append(f"--partition={la.partition}")
    if la.time:
        cmd.append(f"--time={la.time}")
    if la.account:
        cmd.append(f"--account={la.account}")
    if la.gpus_per_node:
        cmd.append(f"--gpus-per-node={la.gpus_per_node}")
    return [*cmd, *la.sbatch_extra, str(SBATCH_SCRIPT), str(cfg_path), *(f"--set={o}" for o in overrides)]
