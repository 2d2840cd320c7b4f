"""The contract between the training loop and a sharding engine.

The loop never knows which engine shards the model. It asks the engine to wrap the model, run backward on a loss,
take an optimizer step, save/load checkpoints and gather the adapter weights. Each engine (none, ddp, fsdp, deepspeed)
implements this class in its own module and is chosen by `shardtune.parallel.make_engine`.

Loss convention: the loop passes `loss = sum(token losses in this micro batch) / (target tokens in the whole global
batch, all ranks and micro steps)`. `backward(loss)` must leave gradients equal to the gradient of the sum of these
contributions over every rank and micro step, so a run gives the same trajectory on 1 or N ranks with the same global
batch. Engines that average gradients over ranks (DDP, FSDP, DeepSpeed) therefore scale by the world size, and
DeepSpeed additionally undoes its own 1/gradient_accumulation_steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Engine:
    """Base class; subclasses override what differs. Attributes set by `setup`: model, optimizer, scheduler."""

    name = "base"

    def __init__(self, cfg, dist: DistInfo, device: torch.device, compute_dtype: torch.dtype):
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.compute_dtype = compute_dtype
        self.model: Optional[nn.Module] = None
        self.optimizer = None
        self.scheduler = None

    # -- set-up -------------------------------------------------------------------------------------------------
    def build_model(self, model_dir: Path) -> nn.Module:
        """Load base + method (LoRA / full) for this rank. The default loads a full replica on this rank's device;
        sharded engines override it to build on the meta device and materialize only their shard."""
        if self.cfg.model.random_init:
            from shardtune.model.stream import build_streamed_model
            return build_streamed_model(self.cfg, model_dir, self.device, self.compute_dtype, random_init=True)
        from shardtune.model.load import build_model
        return build_model(self.cfg, model_dir, self.device, self.compute_dtype)

    def setup(self, model: nn.Module, total_steps: int) -> nn.Module:
        """Wrap/shard `model`, build optimizer + LR scheduler over the trainable parameters. Returns the model to call."""
        raise NotImplementedError

    # -- one step -----------------------------------------------------------------------------------------------
    def accumulating(self, is_last_micro_step: bool):
        """Context for a micro step; engines that all-reduce in backward skip the reduction until the last one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """Clip to train.grad_clip, step the optimizer and the scheduler, zero grads. Returns the pre-clip global
        grad norm as a 0-d tensor (no host sync). Engines with their own optimizer wrapper (DeepSpeed) override it;
        the others share this and only say how to clip (`clip_gradients`)."""
        scaler = getattr(self, "scaler", None)
        if scaler:
            scaler.unscale_(self.optimizer)
        norm = self.clip_gradients()
        if scaler:
            scaler.step(self.optimizer)  # skips the step when the unscaled gradients hold inf/nan
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def clip_gradients(self) -> torch.Tensor:
        """Global grad norm of the trainable parameters, clipped in place to train.grad_clip (0 = no clipping)."""
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, clip)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- collectives the loop needs -------------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: Path, client_state: dict[str, Any]) -> None:
        """Write model-trainable + optimizer + scheduler state (sharded where the engine shards) into ckpt_dir."""
        raise NotImplementedError

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights on CPU, keyed like the unwrapped peft model's state_dict.
        Every rank must call it (it may use collectives); only rank 0's result is used."""
        raise NotImplementedError

    def unwrapped(self) -> nn.Module:
        """The peft/transformers module underneath any wrapper (for save_pretrained of configs, generation)."""
        return self.model

    # -- reporting ------------------------------------------------------------------------------------------------
    def local_param_bytes(self) -> int:
        """Bytes of parameter storage this rank holds on its device (the shard for sharded engines)."""
        total = 0
        for p in self.unwrapped().parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            if t.device.type != "meta":
                total += t.numel() * t.element_size()
        return total
