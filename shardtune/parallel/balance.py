"""The start-of-run balance check: every rank reports the parameter bytes it holds and its device memory; a rank far
from the mean stops the run (the classic silent failure is rank 0 holding the whole model and the others ~nothing)."""

from __future__ import annotations

import torch

from shardtune.errors import ImbalanceError

# Device memory is also compared, but only on GPUs and only when the differences are large in absolute terms:
# allocator slack, rotary caches and communication buffers make small totals noisy.
MEMORY_FLOOR_BYTES = 256 * 2**20


def tensor_local_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` stored on this rank: the local shard of a DTensor, the partition of a ZeRO-3 parameter,
    nothing for meta tensors."""
    if hasattr(t, "ds_tensor"):  # DeepSpeed ZeRO-3: param.data is empty outside forward; the partition is ds_tensor
        t = t.ds_tensor
    elif hasattr(t, "to_local"):
        t = t.to_local()
    if t.device.type == "meta":
        return 0
    return t.numel() * t.element_size()


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil
    return int(psutil.Process().memory_info().rss)


def gather_rank_stats(engine) -> list[tuple[int, int]]:
    """[(param bytes, device memory bytes)] for every rank (a collective: all ranks must call it)."""
    mine = torch.tensor([engine.local_param_bytes(), device_memory_bytes(engine.device)], dtype=torch.int64,
                        device=engine.device)
    world = engine.dist.world_size
    if world == 1:
        return [tuple(int(v) for v in mine.tolist())]
    import torch.distributed as dist
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [tuple(int(v) for v in t.tolist()) for t in out]


def outliers(values: list[int], tolerance: float, floor: int = 0) -> list[int]:
    """Indices whose value differs from the mean by more than `tolerance` (relative) and more than `floor` bytes."""
    mean = sum(values) / max(len(values), 1)
    return [i for i, v in enumerate(values) if abs(v - mean) > tolerance * mean and abs(v - mean) > floor]


def _gib(b: float) -> str:
    return f"{b / 2**30:.3f} GiB" if b >= 2**27 else f"{b / 2**20:.2f} MiB"


def check_balance(engine, tolerance: float = 0.15, out=print) -> list[tuple[int, int]]:
    """Print one line per rank (on rank 0) and raise ImbalanceError if any rank's parameter bytes (or, on GPUs, its
    allocated memory) differ from the mean by more than `tolerance`. Every rank raises, so no rank hangs."""
    stats = gather_rank_stats(engine)
    params = [s[0] for s in stats]
    mem = [s[1] for s in stats]
    mem_kind = "allocated" if engine.device.type == "cuda" else "rss"
    if engine.dist.rank == 0:
        mean_p = sum(params) / len(params)
        for r, (p, m) in enumerate(stats):
            dev = 100 * (p - mean_p) / mean_p if mean_p else 0.0
            out(f"rank {r}: parameters {_gib(p)} ({dev:+.1f}% of mean), device memory {_gib(m)} {mem_kind}")
    bad_p = outliers(params, tolerance)
    bad_m = outliers(mem, tolerance, MEMORY_FLOOR_BYTES) if engine.device.type == "cuda" else []
    if bad_p or bad_m:
        mean_p = sum(params) / len(params)
        parts = []
        if bad_p:
            parts.append("parameter bytes of rank(s) " + ", ".join(f"{r} ({_gib(params[r])})" for r in bad_p)
                         + f" differ from the mean {_gib(mean_p)} by more than {tolerance:.0%}")
        if bad_m:
            mean_m = sum(mem) / len(mem)
            parts.append("allocated memory of rank(s) " + ", ".join(f"{r} ({_gib(mem[r])})" for r in bad_m)
                         + f" differs from the mean {_gib(mean_m)} by more than {tolerance:.0%}")
        raise ImbalanceError("; ".join(parts) + f" with parallel.strategy={engine.name}: the model is not sharded "
                             "evenly; check that every rank built its shard (see docs/distributed.md), or raise "
                             "parallel.balance_tolerance if this is expected")
    return stats
