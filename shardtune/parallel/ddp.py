"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward. For models
whose 4-bit base fits on one GPU; it is the fastest engine when it fits (no parameter gathers)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from shardtune.parallel.single import SingleEngine
from shardtune.train.optim import build_optimizer, build_scheduler


class DDPEngine(SingleEngine):
    """Checkpoints and the adapter gather come from SingleEngine (replicas are identical)."""
    name = "ddp"

    def setup(self, model: nn.Module, total_steps: int) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from shardtune.parallel.fsdp import refuse_deepspeed_json
        from shardtune.parallel.launch import ensure_process_group
        refuse_deepspeed_json(self.cfg, self.name)
        ensure_process_group(self.device)
        self.inner = model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # frozen 4-bit storage is identical on every rank (same checkpoint, same quantization); only trainable
        # parameters take part in the reduction
        self.model = DDP(model, device_ids=ids, output_device=ids[0] if ids else None,
                         find_unused_parameters=False, broadcast_buffers=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        return self.model

    def accumulating(self, is_last_micro_step: bool):
        return contextlib.nullcontext() if is_last_micro_step else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages over ranks; the loss convention wants the sum
        loss = loss * self.dist.world_size
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unwrapped(self) -> nn.Module:
        return self.inner
