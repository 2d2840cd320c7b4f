"""Optimizer and learning-rate schedule, shared by every engine."""

from __future__ import annotations

import math

import torch

from shardtune.errors import EnvironmentProblem


def build_optimizer(params, tcfg, device: torch.device, fused: bool | None = None):
    """AdamW from torch, or the bitsandbytes 8-bit / paged AdamW (CUDA only). `fused=False` where a sharded grad
    scaler drives the step: FSDP's ShardedGradScaler hands fused AdamW a found_inf of shape [1], which it rejects."""
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if tcfg.optimizer == "adamw":
        fused = device.type == "cuda" if fused is None else (fused and device.type == "cuda")
        return torch.optim.AdamW(params, fused=fused, **kw)
    if device.type != "cuda":
        raise EnvironmentProblem(f"train.optimizer={tcfg.optimizer} needs CUDA (bitsandbytes 8-bit optimizers); "
                                 "use train.optimizer=adamw on CPU")
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if tcfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kw)


def lr_lambda(tcfg, total_steps: int):
    """Multiplier on the peak LR at optimizer step `s` (0-based): linear warmup, then constant/linear/cosine to 0."""
    warm = max(0, min(tcfg.warmup_steps, total_steps))

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if tcfg.schedule == "constant":
            return 1.0
        frac = (s - warm) / max(1, total_steps - warm)
        frac = min(max(frac, 0.0), 1.0)
        if tcfg.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def build_scheduler(optimizer, tcfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
