"""DistributedDataParallel: a full replica per rank, gradients all-reduced in buckets during backward. For models
whose 4-bit base fits on one GPU; it is the fastest engine when it fits (no parameter gathers)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardtune.parallel.base import Engine
from shardtune.train.optim import build_optimizer, build_scheduler


class DDPEngine(Engine):
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

    def step(self) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def unwrapped(self) -> nn.Module:
        return self.inner

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.inner.named_parameters() if p.requires_grad}

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict[str, Any]) -> None:
        """Replicas are identical: rank 0 writes one file, like the one-process engine."""
        if not self.dist.is_main:
            return
        state = {"trainable": self.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "client": client_state}
        torch.save(state, Path(ckpt_dir) / "engine.pt")

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any]:
        state = torch.load(Path(ckpt_dir) / "engine.pt", map_location=self.device, weights_only=False)
        params = dict(self.inner.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        return state["client"]
