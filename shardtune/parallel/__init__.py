"""Engines that run the model on one process or shard it over many: none, ddp, fsdp (FSDP2), deepspeed (ZeRO-2/3)."""

from __future__ import annotations

import os

import torch

from shardtune.errors import ConfigError
from shardtune.parallel.base import DistInfo, Engine
from shardtune.resolve import resolve_strategy  # also the name the trainer imports from here


def dist_info_from_env() -> DistInfo:
    """Rank and world size from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (srun)."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def make_engine(cfg, dist: DistInfo, device: torch.device, dtype: torch.dtype, total_steps: int = 1) -> Engine:
    strategy = resolve_strategy(cfg, dist.world_size)
    if strategy == "none":
        from shardtune.parallel.single import SingleEngine as cls
    elif strategy == "ddp":
        from shardtune.parallel.ddp import DDPEngine as cls
    elif strategy == "fsdp":
        from shardtune.parallel.fsdp import FSDPEngine as cls
    elif strategy == "deepspeed":
        from shardtune.parallel.deepspeed import DeepSpeedEngine as cls
    else:  # pragma: no cover - config validation forbids it
        raise ConfigError(f"parallel.strategy={strategy!r} is unknown")
    return cls(cfg, dist, device, dtype, total_steps)
