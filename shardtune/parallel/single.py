"""One process, one device: plain autograd, optional fp16 loss scaling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shardtune.parallel.base import Engine
from shardtune.train.optim import build_optimizer, build_scheduler


class SingleEngine(Engine):
    name = "none"

    def setup(self, model, total_steps: int):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, self.cfg.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, total_steps)
        # fp16 has too little range for raw gradients; bf16 and fp32 do not need scaling.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.compute_dtype == torch.float16 else None
        return model

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    # The methods below serve DDP too (it subclasses this engine): replicas are identical, so rank 0 writes one
    # file, and unwrapped() is the module under any DDP wrapper.
    def trainable_state_dict(self):
        return {n: p.detach().to("cpu", copy=True) for n, p in self.unwrapped().named_parameters() if p.requires_grad}

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        state = {"trainable": self.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "client": client_state}
        torch.save(state, Path(ckpt_dir) / "engine.pt")

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any]:
        state = torch.load(Path(ckpt_dir) / "engine.pt", map_location=self.device, weights_only=False)
        params = dict(self.unwrapped().named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        return state["client"]
