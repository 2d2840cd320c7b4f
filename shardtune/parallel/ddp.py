"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward. For models
whose 4-bit base fits on one GPU; it is the fastest engine when it fits (no parameter gathers).

It is the one-process engine plus a DDP wrapper: replicas are identical, so checkpoints, the adapter gather and the
optimizer step are the one-process engine's (rank 0 writes one copy)."""

from __future__ import annotations

import contextlib

from torch import nn

from shardtune.parallel.single import SingleEngine


class DDPEngine(SingleEngine):
    name = "ddp"
    direct_forward = False  # DDP's forward hooks (gradient-ready bookkeeping) must run

    def wrap(self, model: nn.Module) -> nn.Module:
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
        return self.model

    def accumulating(self, is_last_micro_step: bool):
        return contextlib.nullcontext() if is_last_micro_step else self.model.no_sync()

    def grad_scale(self) -> float:
        return float(self.dist.world_size)  # DDP averages over ranks; the loss convention wants the sum

    def unwrapped(self) -> nn.Module:
        return self.inner
