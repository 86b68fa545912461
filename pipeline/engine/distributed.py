"""Process-group setup for every launcher (deepspeed, torchrun, srun, plain python) and
preemption signals.

srun sets only SLURM_* variables; DeepSpeed reads RANK/WORLD_SIZE/... (else it tries MPI), so they
are mapped here. A plain ``python -m pipeline.train`` is world size 1.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import warnings

import torch
import torch.distributed as dist

from pipeline.engine.threads import confine_helper_threads

# DeepSpeed JIT-builds its shm collective op on every CPU init (43 s cold on 2 cores);
# a lock older than this was left by a build that was killed, never by one still running.
STALE_BUILD_LOCK_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment_from_slurm() -> None:
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def clear_stale_build_lock(op: str = "deepspeed_shm_comm", max_age_s: float = STALE_BUILD_LOCK_S) -> str | None:
    """Remove torch's JIT build lock for ``op`` when a killed build left it behind.

    torch waits on that lock forever (no timeout, no message): one Ctrl-C during the first run's
    compile made every later run on the machine hang silently in ``init_distributed``."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(op, verbose=False), "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
        if age < max_age_s:
            return None
        os.remove(lock)
    except FileNotFoundError:           # no lock, or another rank removed it first
        return None
    warnings.warn(f"removed {lock}: a build of {op} was killed {age / 60:.0f} min ago and its lock would have "
                  "hung this run", stacklevel=2)
    return lock


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shm all-reduce buffer once every rank has mapped it.

    With ``LOCAL_SIZE`` = the ranks on the node (set above), DeepSpeed's CPU shm op creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never removes
    it: memory held until reboot, run after run, until the OOM killer. Every rank opens every peer's
    buffer inside ``init_distributed``; after the barrier the names can go, the mappings live on
    until the processes exit (crash included)."""
    env = os.environ
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_"
            f"{env.get('MASTER_PORT')}_{dist.get_rank()}")
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):     # the shm op is off (ranks on several nodes) or not built
        os.remove(name)


def init_distributed() -> tuple[int, int, torch.device]:
    """-> (rank, world size, device). Uses NCCL on CUDA and gloo on CPU."""
    import deepspeed

    # DeepSpeed 0.19.8 calls the c10d *_tensor collectives that torch 2.13 deprecates, once per call.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed",
                            category=FutureWarning)
    environment_from_slurm()
    env = os.environ
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        # DeepSpeed 0.19.8's CPU accelerator answers device_count() by running `numactl --hardware`
        # in a subprocess unless LOCAL_SIZE is set, and ZeRO-3 asks once per gradient bucket: 20 %
        # of a small model's step (profiled, README P8). The ranks on this node is the right answer.
        env.setdefault("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", "1"))
        clear_stale_build_lock()
    if not dist.is_initialized():
        confine_helper_threads()        # before gloo starts its work threads: they must start no OpenMP team
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
        if not on_cuda:
            release_shm_buffer()
    local = int(env.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's warning before preemption or time limit). All ranks agree
    on it at a step boundary, so they stop and checkpoint at the same step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signal is not None else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def teardown() -> None:
    """Explicit teardown: without it gloo occasionally aborts at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
