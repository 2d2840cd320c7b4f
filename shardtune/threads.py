"""How many CPU threads each process uses: the one rule for training, generate and evaluate, per rank under --nproc.

Rule (measured in docs/cpu.md): the cores this process may use (CPU affinity and the cgroup quota), minus the cores
other processes keep busy (the 1-minute load average, rounded), shared evenly by the ranks of this node; at least 1.
Inter-op threads: 1 on CPU runs (shardtune runs no independent ops side by side). An OMP_NUM_THREADS the user set
wins. GPU runs split the cores over the local ranks and ignore the load (the CPU only feeds the GPU there).
Why: OpenMP threads spin while they wait for each other; with more threads than free cores, a 2-core machine ran
the quickstart's step 15x slower (1.9 s vs 0.12 s) than with one thread.
"""

from __future__ import annotations

import math
import os

# set in the environment by the process that chose the count (child ranks inherit it and keep it)
_CHOSEN_ENV = "SHARDTUNE_THREADS"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 / v1 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    try:
        quota, period = _read("/sys/fs/cgroup/cpu.max").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(_read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))
        period = int(_read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def busy_cores() -> int:
    """Cores other processes keep busy: the 1-minute load average, rounded (0 where it cannot be read)."""
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return 0


def threads_per_rank(local_ranks: int = 1, on_gpu: bool = False, cores: int | None = None,
                     busy: int | None = None) -> int:
    """The rule above. `cores` / `busy` replace detection (tests)."""
    cores = usable_cores() if cores is None else cores
    free = cores if on_gpu else cores - (busy_cores() if busy is None else busy)
    return max(1, free // max(1, local_ranks))


def _user_threads() -> int | None:
    v = os.environ.get("OMP_NUM_THREADS", "")
    return int(v) if v.isdigit() and int(v) > 0 else None


def child_thread_env(local_ranks: int, on_gpu: bool | None = None) -> dict[str, str]:
    """Environment for the ranks `--nproc N` starts: each gets its share of the cores (torch, OpenMP and MKL all
    read these before any work), unless the user already set OMP_NUM_THREADS."""
    if on_gpu is None:
        on_gpu = os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")
    n = _user_threads() or threads_per_rank(local_ranks, on_gpu)
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), _CHOSEN_ENV: str(n)}


def configure_threads(local_ranks: int | None = None, on_gpu: bool | None = None) -> int:
    """Set this process's torch thread counts by the rule; returns the intra-op count. Call before any torch work."""
    import torch

    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    n = _user_threads() or threads_per_rank(local_ranks, on_gpu)
    torch.set_num_threads(n)
    if not on_gpu:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first inter-op work; then the default stays
            pass
    os.environ[_CHOSEN_ENV] = str(n)
    return n
