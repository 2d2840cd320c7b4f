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

import torch
from torch import nn

from shardtune.errors import ConfigError, EnvironmentProblem
from shardtune.parallel.balance import tensor_local_bytes
from shardtune.parallel.base import Engine

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
    state_format = "deepspeed"  # DeepSpeed's own files (each rank its optimizer partition): same rank count only

    @property
    def local_module_params(self) -> bool:
        """Under ZeRO-3 a module's parameters are gathered by its own hooks, unless a decoder layer above it is a
        leaf (parallel.zero3_leaf_layers): then the whole layer is gathered on entry, children included."""
        from shardtune.parallel.dsconfig import zero_stage
        return zero_stage(self.cfg) != 3 or bool(self.cfg.parallel.zero3_leaf_layers)

    def build_model(self, model_dir: Path) -> nn.Module:
        """parallel.zero3_load=cpu under ZeRO-3: stream the model into CPU RAM (quantized on this rank's device one
        tensor at a time); `wrap` partitions it onto the GPUs. Otherwise a whole replica on this rank's device."""
        from shardtune.parallel.dsconfig import zero_stage
        if zero_stage(self.cfg) == 3 and self.cfg.parallel.zero3_load == "cpu":
            from shardtune.model.stream import build_streamed_model
            from shardtune.parallel.placement import host_place
            return build_streamed_model(self.cfg, model_dir, self.device, self.compute_dtype, place=host_place(),
                                        random_init=bool(self.cfg.model.random_init))
        return super().build_model(model_dir)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Convert the 4-bit layers for stage 3 and resolve the DeepSpeed config; `deepspeed.initialize` runs in
        `setup`, once the trainer has built the optimizer."""
        try:
            import deepspeed  # noqa: F401
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
            if self.cfg.parallel.zero3_leaf_layers:
                if not self.cfg.train.gradient_checkpointing:
                    raise ConfigError("parallel.zero3_leaf_layers=true needs train.gradient_checkpointing=true "
                                      "(without recomputation DeepSpeed's backward reads released weights); "
                                      "turn on checkpointing or set parallel.zero3_leaf_layers=false")
                _decoder_layers_as_leaves(model)
        ds_cfg, filled = build_ds_config(self.cfg, self.dist.world_size, compute_dtype=self.compute_dtype,
                                         hidden_size=_hidden_size(model), total_steps=self.total_steps,
                                         min_quant_numel=_min_quant_numel(model) if self.stage == 3 else None)
        check_quant_storage(model, cast_dtype(ds_cfg), "DeepSpeed")
        if self.stage == 3 and self.cfg.parallel.zero3_load == "cpu":
            # each parameter moves to the device, is broadcast from rank 0 and partitioned before the next one;
            # deepspeed.initialize then sees ZeRO-3 parameters and neither moves nor re-partitions the module
            import deepspeed
            # the same call deepspeed.initialize makes on the default path (parameter_offload.py), with its defaults
            deepspeed.zero.Init(module=model, config_dict_or_path=ds_cfg, dtype=self.compute_dtype)
            if self.dist.is_main:
                print("load: the model was read into CPU RAM and partitioned onto the devices one parameter at a "
                      "time (parallel.zero3_load=cpu)", flush=True)
            for m in model.modules():  # buffers (RoPE's inv_freq) are not parameters: DeepSpeed leaves them be
                for k, b in list(m._buffers.items()):
                    if b is not None and b.device != self.device:
                        m._buffers[k] = b.to(self.device)
        if self.dist.is_main and (self.cfg.parallel.deepspeed_config or filled):
            print(describe_filled(filled, self.cfg.parallel.deepspeed_config, adopted_from_json(self.cfg)), flush=True)
        self.ds_config = ds_cfg
        z = ds_cfg["zero_optimization"]
        self.offload_opt = isinstance(z.get("offload_optimizer"), dict) and \
            z["offload_optimizer"].get("device", "none") != "none"
        self.brings_optimizer = "optimizer" in ds_cfg
        self.brings_scheduler = "scheduler" in ds_cfg
        self.model = model
        return model

    @property
    def optimizer_device(self) -> torch.device:
        return torch.device("cpu") if self.offload_opt else self.device

    def setup(self, optimizer, schedule):
        import deepspeed
        model = self.model
        params = [p for _, p in self.named_trainable()]
        # DeepSpeed takes the schedule as a callable on the optimizer it wraps
        scheduler = None if self.brings_scheduler else schedule
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=None if self.brings_optimizer else optimizer,
            lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False)
        from shardtune.parallel.safe_load import SafeTorchCheckpointEngine
        self.ds.checkpoint_engine = SafeTorchCheckpointEngine(self.ds.checkpoint_engine)
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

    def step(self, finite_loss: bool = True) -> tuple[torch.Tensor, bool]:
        """DeepSpeed computes the norm inside its step and skips the update itself when the gradients hold inf/nan
        (fp16 loss scaling, and bf16's check_grad_overflow, on by default): neither the optimizer nor the LR
        schedule advances. A non-finite loss gives non-finite gradients, so it is skipped the same way."""
        skipped = self.ds.skipped_steps
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            norm = float("nan")
        return torch.as_tensor(float(norm)), self.ds.skipped_steps == skipped

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def unwrapped(self) -> nn.Module:
        return self.ds.module if hasattr(self, "ds") else self.model  # before setup: the module about to be wrapped

    def save_checkpoint(self, ckpt_dir: Path) -> list[Path]:
        """DeepSpeed's own sharded format (each rank writes its optimizer partition); frozen base weights excluded.
        Its files are torch pickles: they are loaded with weights_only=True and an allow-list (parallel/safe_load)."""
        before = set(Path(ckpt_dir).rglob("*"))
        self.ds.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
        return sorted(p for p in set(Path(ckpt_dir).rglob("*")) - before if p.is_file())

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=TAG, load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"no DeepSpeed checkpoint in {ckpt_dir}/{TAG}; was it written by parallel.strategy=deepspeed?")

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


def _decoder_layers_as_leaves(model: nn.Module) -> int:
    """Mark each decoder layer a ZeRO-3 leaf: DeepSpeed then registers its gather/release hooks on the layer alone
    and fetches all of the layer's parameters (4-bit weights, norms, LoRA) in one go, instead of running hooks and a
    fetch for each of its ~40 submodules. Only with gradient checkpointing: the recompute runs inside the layer's
    backward, after the pre-backward hook has gathered the layer again; without it DeepSpeed 0.19.8's backward
    reaches the layer's linears while their weights are released (2-rank CPU test: 'size of tensor a (0)')."""
    from deepspeed.utils import set_z3_leaf_module
    from shardtune.parallel.fsdp import decoder_layers
    layers = decoder_layers(model)
    for layer in layers:
        set_z3_leaf_module(layer, True)
    return len(layers)
