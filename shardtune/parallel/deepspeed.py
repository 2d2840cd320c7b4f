"""DeepSpeed ZeRO-2/3 (optionally offloading optimizer state and, for stage 3, parameters to the CPU).

QLoRA under ZeRO-3 without transformers' zero.Init path: the 4-bit model is loaded normally first (quant storage =
compute dtype, so the packed data is a float tensor), then `deepspeed.initialize` partitions the existing module's
parameters. The 'weight has shape [0]' and 'Model was not initialized with Zero-3' failures come from loading *inside*
zero.Init and cannot happen here. For stage 3 the Linear4bit layers are first converted to ShardedLinear4bit
(shardtune.parallel.quant4) so their quantization constants are partitioned too and the forward never depends on a
replicated quant_state.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardtune.errors import ConfigError, EnvironmentProblem
from shardtune.parallel.balance import tensor_local_bytes
from shardtune.parallel.base import Engine
from shardtune.train.optim import build_optimizer, build_scheduler

TAG = "deepspeed"

# DeepSpeed 0.19 calls torch.distributed.all_gather_into_tensor, which torch 2.13 deprecates: one warning per call
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _hidden_size(model: nn.Module) -> int | None:
    c = getattr(model, "config", None)
    c = getattr(c, "get_text_config", lambda: c)() if c is not None else None
    return getattr(c, "hidden_size", None)


def _min_quant_numel(model: nn.Module) -> int | None:
    import bitsandbytes as bnb
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    sizes += [m.quant_blob.numel() for m in model.modules() if hasattr(m, "quant_blob")]
    return min(sizes) if sizes else None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def setup(self, model: nn.Module, total_steps: int):
        try:
            import deepspeed
        except ImportError:
            raise EnvironmentProblem("parallel.strategy=deepspeed needs deepspeed; pip install 'shardtune[deepspeed]'") from None
        from shardtune.parallel.dsconfig import (adopted_from_json, build_ds_config, cast_dtype, describe_filled,
                                                 zero_stage)
        from shardtune.parallel.launch import ensure_process_group, init_deepspeed_comm
        from shardtune.parallel.quant4 import check_quant_storage, make_shardable

        ensure_process_group(self.device)
        init_deepspeed_comm(self.device)
        self.stage = zero_stage(self.cfg)
        if self.stage == 3:  # first: the persistence threshold depends on the converted layers' constants
            make_shardable(model, weight_dtype=self.compute_dtype)
        ds_cfg, filled = build_ds_config(self.cfg, self.dist.world_size, compute_dtype=self.compute_dtype,
                                         hidden_size=_hidden_size(model), total_steps=total_steps,
                                         min_quant_numel=_min_quant_numel(model) if self.stage == 3 else None)
        check_quant_storage(model, cast_dtype(ds_cfg), "DeepSpeed")
        if self.dist.is_main and (self.cfg.parallel.deepspeed_config or filled):
            print(describe_filled(filled, self.cfg.parallel.deepspeed_config, adopted_from_json(self.cfg)), flush=True)
        self.ds_config = ds_cfg
        z = ds_cfg["zero_optimization"]
        offload_opt = isinstance(z.get("offload_optimizer"), dict) and z["offload_optimizer"].get("device", "none") != "none"

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = build_optimizer(params, self.cfg.train, torch.device("cpu") if offload_opt else self.device)
        scheduler = None
        if "scheduler" not in ds_cfg:
            tcfg = self.cfg.train
            scheduler = lambda opt: build_scheduler(opt, tcfg, total_steps)  # noqa: E731 - DeepSpeed takes a callable
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg,
            dist_init_required=False)
        self.model = self.ds
        return self.ds

    def accumulating(self, is_last_micro_step: bool):
        # ZeRO reduces (stage 2/3: reduce-scatters) at the boundary only
        self.ds.set_gradient_accumulation_boundary(is_last_micro_step)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks: scale by the world size; gas scaling is turned off (the loop's loss
        # is already normalised over the whole global batch)
        self.ds.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = float("nan")
        return torch.as_tensor(float(norm))

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def unwrapped(self) -> nn.Module:
        return self.ds.module

    def save_checkpoint(self, ckpt_dir: Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed's own sharded format (each rank writes its optimizer partition); frozen base weights excluded."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, client_state=dict(client_state), save_latest=False,
                                exclude_frozen_parameters=True)

    def load_checkpoint(self, ckpt_dir: Path) -> dict[str, Any]:
        path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"no DeepSpeed checkpoint in {ckpt_dir}/{TAG}; was it written by parallel.strategy=deepspeed?")
        return client or {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 LoRA weights (DeepSpeed's master copy, gathered over ranks under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param
        out = {}
        for n, p in self.ds.module.named_parameters():
            if p.requires_grad:
                full = safe_get_full_fp32_param(p)
                if full is None:
                    full = p.detach()
                out[n] = full.detach().float().to("cpu", copy=True)
        return out

    def local_param_bytes(self) -> int:
        # ZeRO-3: the partition (ds_tensor), wherever it lives (GPU or offloaded); ZeRO-2: the full replica
        return sum(tensor_local_bytes(p) for p in self.ds.module.parameters())
