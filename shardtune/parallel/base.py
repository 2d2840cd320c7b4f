"""The contract between the training loop and a sharding engine.

The loop never knows which engine shards the model. The trainer builds the model, the optimizer and the LR schedule;
the engine wraps or shards the model (`wrap`), takes the optimizer the trainer built (`setup`), runs backward and the
optimizer step, and saves/loads its share of the training state. What the loop and the checkpoints need to know
about an engine it declares as attributes (`direct_forward`, `state_format`, ...), never through its name.
Each engine (none, ddp, fsdp, deepspeed) implements this class in its own module and is chosen by
`shardtune.parallel.make_engine`.

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
from typing import Any, Callable, Optional

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
    """Base class; subclasses override what differs. `setup` sets model, optimizer, scheduler."""

    name = "base"
    # the loop may call the decoder and the head itself (fused loss without the model's forward): only when no
    # wrapper has hooks on the model's forward
    direct_forward = False
    # how the training state is stored: "replicated" (rank 0 writes one copy), "sharded" (every rank writes its
    # shard; re-sharded on load for any rank count) or "deepspeed" (DeepSpeed's own files; same rank count only)
    state_format = "replicated"
    # True when the engine's run-time configuration (a DeepSpeed JSON) carries its own optimizer / LR schedule
    brings_optimizer = False
    brings_scheduler = False
    # a module's parameters are whole tensors inside its forward, also when read by a parent module's code (False
    # under ZeRO-3, whose per-module hooks gather them only when that module itself is called): fused LoRA needs it
    local_module_params = True

    @property
    def loss_scaling(self) -> bool:
        """True when skipped updates can be a loss scaler's overflow handling (fp16), not divergence."""
        return self.compute_dtype == torch.float16

    def __init__(self, cfg, dist: DistInfo, device: torch.device, compute_dtype: torch.dtype, total_steps: int = 1):
        self.cfg = cfg
        self.total_steps = total_steps  # optimizer steps of the run (a DeepSpeed JSON's "auto" scheduler counts)
        self.dist = dist
        self.device = device
        self.compute_dtype = compute_dtype
        self.model: Optional[nn.Module] = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
        self.params: list[nn.Parameter] = []

    # -- set-up -------------------------------------------------------------------------------------------------
    def build_model(self, model_dir: Path) -> nn.Module:
        """Load base + method (LoRA / full) for this rank. The default loads a full replica on this rank's device;
        sharded engines override it to build on the meta device and materialize only their shard."""
        if self.cfg.model.random_init:
            from shardtune.model.stream import build_streamed_model
            return build_streamed_model(self.cfg, model_dir, self.device, self.compute_dtype, random_init=True)
        from shardtune.model.load import build_model
        return build_model(self.cfg, model_dir, self.device, self.compute_dtype)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap or shard `model` (no optimizer yet). Afterwards `named_trainable()` lists what the optimizer steps."""
        self.model = model
        return model

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trainable parameter as the optimizer sees it (sharded engines: the shards),
        named like the unwrapped peft model's state_dict."""
        return [(n, p) for n, p in self.unwrapped().named_parameters() if p.requires_grad]

    @property
    def optimizer_device(self) -> torch.device:
        """Where the optimizer state lives (the CPU when the engine offloads it)."""
        return self.device

    @property
    def fused_optimizer(self) -> Optional[bool]:
        """Whether the optimizer may use the fused kernel (None: the optimizer's own default for the device)."""
        return None

    def setup(self, optimizer, schedule: Callable) -> nn.Module:
        """Take the optimizer the trainer built over `named_trainable()` (None when `brings_optimizer`) and
        `schedule(optimizer) -> LR scheduler`. Returns the model to call."""
        self.params = [p for _, p in self.named_trainable()]
        self.optimizer = optimizer
        self.scheduler = schedule(optimizer)
        # fp16 has too little range for raw gradients; bf16 and fp32 do not need scaling
        if self.compute_dtype == torch.float16:
            self.scaler = self.make_scaler()
        return self.model

    def make_scaler(self):
        return torch.amp.GradScaler(self.device.type)

    # -- one step -----------------------------------------------------------------------------------------------
    def accumulating(self, is_last_micro_step: bool):
        """Context for a micro step; engines that all-reduce in backward skip the reduction until the last one."""
        return contextlib.nullcontext()

    def grad_scale(self) -> float:
        """Factor the loop's loss is multiplied by before backward (engines that average over ranks: world size)."""
        return 1.0

    def backward(self, loss: torch.Tensor) -> None:
        scale = self.grad_scale()
        if scale != 1.0:
            loss = loss * scale
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, finite_loss: bool = True) -> tuple[torch.Tensor, bool]:
        """Clip to train.grad_clip, step the optimizer and the scheduler, zero grads. Returns the pre-clip global
        grad norm (0-d tensor) and whether the update was applied. A non-finite loss, or a non-finite gradient norm
        without a loss scaler, skips the update (no optimizer or scheduler step); with an fp16 loss scaler, inf
        gradients are the scaler's business (it skips and lowers the scale). Engines with their own optimizer
        wrapper (DeepSpeed) override it; the others share this and only say how to clip (`clip_gradients`)."""
        scaler = self.scaler
        if scaler:
            scaler.unscale_(self.optimizer)
        norm = self.clip_gradients()
        # one host read per step: a diverged step must not reach the weights (docs/reliability.md)
        applied = finite_loss and (scaler is not None or bool(torch.isfinite(norm)))
        if applied:
            if scaler:
                scaler.step(self.optimizer)  # skips the step when the unscaled gradients hold inf/nan
                scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        elif scaler:
            scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), applied

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
    def save_checkpoint(self, ckpt_dir: Path) -> list[Path]:
        """Write this rank's share of the trainable weights, optimizer, scheduler and scaler state into ckpt_dir
        (safetensors + JSON, no pickle). Returns the files this rank wrote (they are fsynced and listed in the
        checkpoint's manifest)."""
        from shardtune.parallel.state import save_training_state
        return save_training_state(self, Path(ckpt_dir))

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        from shardtune.parallel.state import load_training_state
        load_training_state(self, Path(ckpt_dir))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights on CPU, keyed like the unwrapped peft model's state_dict.
        Every rank must call it (it may use collectives); only rank 0's result is used."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.named_trainable()}

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
