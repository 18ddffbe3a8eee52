"""Rank and world discovery, process-group setup and the few collectives bookgen uses.

Works under torchrun and the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), under srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...), and as a plain single process. DeepSpeed itself
never reads SLURM_* and, with nothing set, tries MPI discovery, so the environment is filled here.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import os
import shutil
import socket
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bookgen.deepspeed_import import load_deepspeed
from bookgen.native_ops import build_lock_notice
from bookgen.restart_guard import restarted


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def discover(env: Mapping[str, str]) -> DistEnv:
    """Rank layout from the launcher's variables; a pure function of ``env`` except for a free port."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun with one task per rank; the first node of the allocation hosts the rendezvous
        nodes = env.get("SLURM_NNODES", "1")
        first = env.get("BOOKGEN_MASTER_ADDR") or env.get("SLURMD_NODENAME", "127.0.0.1")
        tasks_per_node = int(env["SLURM_NTASKS"]) // max(1, int(nodes))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)), local_world_size=tasks_per_node,
            master_addr=env.get("MASTER_ADDR", first),
            master_port=int(env.get("MASTER_PORT", 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)),
        )
    return DistEnv(0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port())


def export_env(dist: DistEnv, env: MutableMapping[str, str]) -> None:
    env.update({
        "RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size), "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
    })


def device_for(dist: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def setup(timeout_s: int) -> DistEnv:
    """Discover the layout, size CPU threads, and start the process group through DeepSpeed."""
    if not torch.cuda.is_available():  # said, not guessed: DeepSpeed warns at every start when it has to guess
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = load_deepspeed()

    dist = discover(os.environ)
    export_env(dist, os.environ)
    if not torch.cuda.is_available():
        # torchrun forces 1 thread per rank and the deepspeed launcher leaves it unset: share the cores
        threads = max(1, (os.cpu_count() or 1) // dist.local_world_size)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if dist.world_size == 1 or shutil.which(os.environ.get("CXX", "c++")) is None:
            # DeepSpeed JIT-compiles its shared-memory collectives at start (half a minute, once a machine): a
            # single rank shares memory with no peer, and without a compiler they cannot be built
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        elif deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm"):
            notice = build_lock_notice("deepspeed_shm_comm")  # loaded by init_distributed below
            if notice is not None:
                warn(dist, notice)
    device_for(dist)
    # DeepSpeed's ZeRO-1/2/3 call these renamed collectives several times a step, and a warnings filter
    # reset inside its step brings the warning back every time: thousands of lines in a long run
    renamed = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=renamed, category=FutureWarning)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed prints "... built successfully" when it loads its shared-memory collectives: kept off the
    # console, shown only if starting fails
    if restarted(os.environ) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_restarted_group(backend, dist, datetime.timedelta(seconds=timeout_s))
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                       verbose=False)
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    return dist


def _init_restarted_group(backend: str, dist: DistEnv, timeout: datetime.timedelta) -> None:
    """The process group of ranks torchrun restarted, its keys kept apart from the failed attempt's.

    torchrun's store (its agent's) outlives a restart with the failed attempt's keys still in it: a restarted
    rank can read a dead peer's address before that peer has published its new one, and gloo gives up on the
    refused connection (seen under load). DeepSpeed takes the initialised group as it is."""
    store = torch.distributed.TCPStore(dist.master_addr, dist.master_port, dist.world_size, is_master=False,
                                       timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"bookgen/attempt_{attempt}",
                                                                                      store),
                                         rank=dist.rank, world_size=dist.world_size, timeout=timeout)


@contextmanager
def process_group(timeout_s: int) -> Iterator[DistEnv]:
    """Set up, yield the layout, and leave: together after success, at once after an error."""
    dist = setup(timeout_s)
    try:
        yield dist
    except BaseException as exc:
        # As after a normal return, drop the engine and its communication buffers before the group goes:
        # the traceback's frames would otherwise keep them alive until interpreter shutdown, where Gloo's
        # threads releasing them can abort the process ("terminate called without an active exception").
        traceback.clear_frames(exc.__traceback__)
        gc.collect()
        teardown(synchronize=False)
        raise
    teardown()


def teardown(*, synchronize: bool = True) -> None:
    """Leave the process group. After a normal run all ranks leave together: a rank that tore down while
    a peer still used the group was seen to abort at exit ("terminate called without an active
    exception"). After an error, do not wait for peers that may be gone."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if synchronize and torch.distributed.get_world_size() > 1:
        try:
            if torch.distributed.get_backend() == "gloo":
                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                torch.distributed.barrier()
        except RuntimeError:
            pass  # a peer is gone; leaving is all that is left to do
    torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum a few numbers (floats or 0-d tensors already on ``device``) over all ranks, in float64 so token
    counts stay exact. Reading the result is the one wait for the device."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def broadcast_object(value: object) -> object:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def gather_objects(value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [value]
    gathered: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def gather_errors(error: str | None) -> list[str]:
    """Every rank's error message (None: no error), so that all ranks stop together when any one fails."""
    return [e for e in gather_objects(error) if isinstance(e, str) and e]


def warn(dist: DistEnv, message: str) -> None:
    """Non-zero ranks are quiet, except when something is wrong: then they say who they are."""
    print(f"[bookgen rank {dist.rank}/{dist.world_size}] {message}", file=sys.stderr, flush=True)
