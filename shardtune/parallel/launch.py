"""Process-group set-up and self-launch: `shardtune train --nproc N` starts this node's ranks itself
(parallel/supervise.py); runs started by torchrun, the deepspeed launcher or Slurm's srun are recognised and joined."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from typing import TYPE_CHECKING

from shardtune.errors import ConfigError, EnvironmentProblem

if TYPE_CHECKING:  # torch is imported lazily: `shardtune train --nproc N` only spawns torchrun in this process
    import torch

    from shardtune.parallel.base import DistInfo


def detect_launcher(env: dict | None = None) -> str | None:
    """'torchrun' | 'deepspeed' | 'slurm' | 'env' (RANK/WORLD_SIZE set by something else) | None (plain process)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return "torchrun"
    if "WORLD_SIZE" in env and "RANK" in env:
        # deepspeed's launcher (deepspeed.launcher.launch) exports these plus CROSS_RANK / LOCAL_SIZE
        return "deepspeed" if "CROSS_RANK" in env or "DS_ACCELERATOR_LAUNCH" in env else "env"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as 'gpu[03-05,07],cpu1' -> 'gpu03' (what `scontrol show hostnames`
    prints first), without needing scontrol on the compute node."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_from_slurm(env=None) -> None:
    """Export what torch's env:// rendezvous needs from srun's variables (one task per GPU) into `env` (os.environ)."""
    env = os.environ if env is None else env
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    if "MASTER_PORT" not in env:
        # a port derived from the job id, so two jobs sharing a node do not collide
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(dist: DistInfo, device: torch.device, timeout_min: float = 30.0) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU). Idempotent. DeepSpeed attaches to the same group later
    (deepspeed.init_distributed finds torch.distributed initialised), so one call serves every engine."""
    import torch.distributed as tdist
    if dist.world_size <= 1 or tdist.is_initialized():
        return
    if detect_launcher() == "slurm":
        _env_from_slurm()
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise EnvironmentProblem(f"{' and '.join(missing)} not set for a {dist.world_size}-process run; start it with "
                                 "`shardtune train --nproc N`, torchrun, the deepspeed launcher or srun")
    os.environ.setdefault("RANK", str(dist.rank))
    os.environ.setdefault("WORLD_SIZE", str(dist.world_size))
    os.environ.setdefault("LOCAL_RANK", str(dist.local_rank))
    # On GPUs, gloo beside NCCL serves collectives on CPU tensors (FSDP CPU offload gathers the adapter from CPU shards)
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else backend_for(device)
    kw = dict(backend=backend, rank=dist.rank, world_size=dist.world_size,
              timeout=datetime.timedelta(minutes=timeout_min))
    if device.type == "cuda":
        kw["device_id"] = device  # binds NCCL to this GPU up front (no guessing from LOCAL_RANK)
    tdist.init_process_group(**kw)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none exists: fsdp/deepspeed on a single GPU still need collectives (a mesh of one).
    Uses an in-memory store, so nothing listens on a port."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EnvironmentProblem("WORLD_SIZE > 1 but the process group is not initialised; call init_distributed first")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):  # DeepSpeed reads these
        os.environ.setdefault(k, v)
    tdist.init_process_group(backend_for(device), store=tdist.HashStore(), rank=0, world_size=1)


def init_deepspeed_comm(device: torch.device) -> None:
    """Make DeepSpeed's communication layer use the torch process group already created by `init_distributed`."""
    import deepspeed
    import torch.distributed as tdist
    if device.type == "cpu" and os.environ.get("SHARDTUNE_DS_SHM") != "1":
        # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op at its first communication set-up
        # (minutes on a small machine, every fresh install). CPU runs are for tests and tiny jobs; gloo is enough.
        # deepspeed.ops keeps this probe result in a module-level dict meant to persist edits.
        import deepspeed.ops as ds_ops
        ops = ds_ops.__compatible_ops__
        if "deepspeed_shm_comm" not in ops:
            raise EnvironmentProblem("this deepspeed version has no 'deepspeed_shm_comm' op entry; shardtune's CPU "
                                     "set-up needs updating (or set SHARDTUNE_DS_SHM=1 to let it compile the op)")
        ops["deepspeed_shm_comm"] = False
    if tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend_for(device))
    else:
        deepspeed.init_distributed(dist_backend=backend_for(device))


DEFAULT_RENDEZVOUS = ("127.0.0.1", 29500)  # the CLI's defaults for --master-addr / --master-port


def relaunch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
             master_port: int = 29500, extra_env: dict | None = None) -> int:
    """Run `shardtune train <argv>` as this node's `nproc` ranks of an `nproc x nnodes` run
    (shardtune.parallel.supervise); returns the run's exit code.

    Multi-node: start the same command on every node with its own --node-rank; rank 0's node hosts the rendezvous at
    --master-addr:--master-port (a static rendezvous, as torchrun's). One node with the default address and port
    picks a free port, so two runs on a machine do not collide."""
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc {nproc} / --nnodes {nnodes}: both must be >= 1")
    if nnodes > 1 and not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} for --nnodes {nnodes}")
    gpus = _visible_gpus()
    if gpus and nproc > gpus:
        raise ConfigError(f"--nproc {nproc} but only {gpus} GPU(s) are visible; use --nproc {gpus} "
                          "(one process per GPU)")
    cores = os.cpu_count() or 1
    if not gpus and nproc > cores:
        raise ConfigError(f"--nproc {nproc} on a CPU machine with {cores} cores (no GPU visible): ranks would share "
                          f"cores and run many times slower; use --nproc {cores} or fewer")
    if nnodes == 1 and (master_addr, master_port) == DEFAULT_RENDEZVOUS:
        master_port = free_port(master_addr)
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    from shardtune.parallel.supervise import supervise
    return supervise(strip_launch_args(argv), nproc, nnodes, node_rank, master_addr, master_port, env)


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _visible_gpus() -> int:
    """GPUs this node shows, without importing torch (nvidia-smi); 0 when there are none or it cannot tell."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def strip_launch_args(argv: list[str]) -> list[str]:
    """argv without --nproc/--nnodes/--node-rank/--master-addr/--master-port (in both '--x v' and '--x=v' forms)."""
    flags = {"--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.split("=", 1)[0] in flags and "=" in a:
            continue
        out.append(a)
    return out
