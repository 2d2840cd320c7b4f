"""FSDP2 (`torch.distributed.fsdp.fully_shard`): one FSDP unit per `parallel.fsdp_layers_per_unit` decoder layers
(auto: two small 4-bit layers, else one), the embeddings and the LM head their own units (when untied), the rest in
the root. QLoRA's 4-bit base is sharded through `ShardedLinear4bit`
(shardtune.parallel.quant4): the packed weights and their quantization constants are ordinary frozen parameters.

ZeRO stages map to `reshard_after_forward`: 3 frees the gathered layer after its forward (re-gathers it in backward),
2 keeps it until backward. `CPUOffloadPolicy` keeps the shards, their gradients and the optimizer step on the CPU:
FSDP2 offloads parameters and optimizer state together, so `offload_param` or `offload_optimizer` turns on both.

`shard_model` is the public entry point and also works on a model on the meta device (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from packaging.version import Version
from torch import nn

from shardtune.errors import ConfigError
from shardtune.parallel.balance import tensor_local_bytes
from shardtune.parallel.base import Engine


def _fsdp_api():
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:  # torch 2.4/2.5 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                                        fully_shard)
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: classes named in transformers' `_no_split_modules`, else the longest
    ModuleList (every decoder-only model in transformers keeps its blocks in one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"parallel.strategy=fsdp: found no decoder layers in {type(base).__name__}; "
                          "use parallel.strategy=ddp or deepspeed for this model")
    return list(max(lists, key=len))


def mixed_precision_policy(compute_dtype: torch.dtype):
    """Gather parameters in the compute dtype (bf16/fp16), reduce LoRA gradients in fp32. fp32 runs need no policy."""
    _, MixedPrecisionPolicy, _, _ = _fsdp_api()
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, cfg, mesh=None, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shard `model` in place with FSDP2 and return it.

    Works on a materialized model (each rank loaded a full replica; the replica is freed as shards are cut) and on a
    model whose parameters are on the meta device (nothing is allocated: call `model.to_empty(device=...)` after this,
    then fill each parameter's local shard with `copy_full_into` / `shardtune.parallel.quant4.quantize_into`).
    Every bitsandbytes Linear4bit is first converted to ShardedLinear4bit so that its constants shard too.
    `cfg` supplies parallel.zero_stage, parallel.offload_param and parallel.offload_optimizer."""
    from shardtune.parallel.quant4 import check_quant_storage, make_shardable
    fully_shard, _, CPUOffloadPolicy, OffloadPolicy = _fsdp_api()
    if _is_fsdp_module(model):  # already sharded (e.g. by build_model before the loop calls setup)
        return model
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        import torch.distributed as dist
        dev = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    make_shardable(model, weight_dtype=compute_dtype)
    mp = mixed_precision_policy(compute_dtype)
    check_quant_storage(model, mp.param_dtype, "FSDP")
    p = cfg.parallel
    offload = p.offload_param or p.offload_optimizer
    off = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload else OffloadPolicy()
    reshard = p.zero_stage == 3
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=off)
    layers = decoder_layers(model)
    k = units_of(layers, p.fsdp_layers_per_unit, compute_dtype)
    if k > 1 and Version(torch.__version__).release < (2, 6):  # fully_shard takes a list of modules from torch 2.6
        k = 1
    model.fsdp_layers_per_unit = k
    for i in range(0, len(layers), k):
        # several consecutive layers in one unit: one gather, one set of hooks (fully_shard takes a list)
        group = layers[i:i + k]
        fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard, **kw)
    # Embeddings and LM head are the largest single tensors (vocab x hidden); separate units gather one at a time.
    # Tied weights must stay in one unit, so they are left to the root.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # (identity over all their parameters: peft's modules_to_save wrapper around a tied lm_head keeps the tied original)
    tied = emb is not None and head is not None and bool(
        {id(q) for q in emb.parameters()} & {id(q) for q in head.parameters()})
    if not tied:
        for m in (emb, head):
            if m is not None and any(True for _ in m.parameters()):
                fully_shard(m, reshard_after_forward=reshard, **kw)
    fully_shard(model, **kw)
    return model


def units_of(layers: list[nn.Module], requested: int, compute_dtype: torch.dtype) -> int:
    """Decoder layers per FSDP unit (shardtune.plan.setup.fsdp_layers_per_unit), from the bytes one layer gathers:
    every parameter at its full size, floating point ones in the compute dtype (FSDP's mixed-precision cast)."""
    from shardtune.plan.setup import fsdp_layers_per_unit
    elem = torch.tensor([], dtype=compute_dtype).element_size()
    gather = sum(q.numel() * (elem if q.dtype.is_floating_point else q.element_size())
                 for q in (layers[0].parameters() if layers else ()))
    return fsdp_layers_per_unit(int(requested), gather, len(layers))


def _is_fsdp_module(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's piece of the full tensor `full` into `param` (a sharded DTensor parameter or a plain one)."""
    with torch.no_grad():
        if hasattr(param, "to_local"):
            from torch.distributed.tensor import Shard
            mesh, placements = param.device_mesh, param.placements
            if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
                raise ValueError(f"copy_full_into supports 1-D meshes with Shard(0), got {placements}")
            local = param.to_local()
            chunks = torch.chunk(full, mesh.size(), dim=0)
            r = mesh.get_local_rank()
            if r < len(chunks) and local.numel():
                local.copy_(chunks[r].reshape(local.shape))
        else:
            param.copy_(full.reshape(param.shape))


def refuse_deepspeed_json(cfg, strategy: str) -> None:
    """A DeepSpeed JSON under another engine would be silently ignored."""
    if cfg.parallel.deepspeed_config:
        raise ConfigError(f"parallel.deepspeed_config={cfg.parallel.deepspeed_config} is set but the run uses "
                          f"parallel.strategy={strategy}; set parallel.strategy=deepspeed, or drop the JSON")


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "full_tensor")


class FSDPEngine(Engine):
    name = "fsdp"
    state_format = "sharded"  # each rank writes its shards; any rank count re-shards them on load
    mesh = None

    def _mesh(self):
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            from shardtune.parallel.launch import ensure_process_group
            ensure_process_group(self.device)
            self.mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        return self.mesh

    def build_model(self, model_dir: Path) -> nn.Module:
        """Meta skeleton + LoRA, sharded while still on the meta device, then only this rank's shards streamed in
        from the checkpoint and quantized on the device (shardtune.model.stream): no rank ever holds the full model.
        The result equals the eager path's (tests/distributed compares trajectories with the one-process run)."""
        from shardtune.model.stream import build_streamed_model
        from shardtune.parallel.placement import fsdp_place
        refuse_deepspeed_json(self.cfg, self.name)
        p = self.cfg.parallel
        place_on = torch.device("cpu") if (p.offload_param or p.offload_optimizer) else self.device
        mesh, cfg, dtype = self._mesh(), self.cfg, self.compute_dtype
        return build_streamed_model(cfg, model_dir, self.device, dtype, place=fsdp_place(place_on),
                                    shard=lambda m: shard_model(m, cfg, mesh, dtype),
                                    random_init=cfg.model.random_init)

    def wrap(self, model: nn.Module) -> nn.Module:
        refuse_deepspeed_json(self.cfg, self.name)
        if self.cfg.train.optimizer != "adamw":
            # bitsandbytes' 8-bit optimizers index raw tensors; FSDP2's parameters are DTensors
            raise ConfigError(f"train.optimizer={self.cfg.train.optimizer} does not work on FSDP2's sharded "
                              "parameters; use train.optimizer=adamw (the optimizer state is sharded anyway)")
        shard_model(model, self.cfg, self._mesh(), self.compute_dtype)
        self.model = model
        p = self.cfg.parallel
        self.offload = p.offload_param or p.offload_optimizer
        return model

    @property
    def optimizer_device(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    @property
    def fused_optimizer(self):
        # ShardedGradScaler hands fused AdamW a found_inf of shape [1], which it rejects
        return False if self.compute_dtype == torch.float16 else None

    def make_scaler(self):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler()

    def accumulating(self, is_last_micro_step: bool):
        # without sync FSDP2 keeps unsharded gradients between micro steps (small: only LoRA parameters train)
        self.model.set_requires_gradient_sync(is_last_micro_step)
        return contextlib.nullcontext()

    def grad_scale(self) -> float:
        return float(self.dist.world_size)  # FSDP2 averages gradients over ranks; the loss convention wants the sum

    def _local_grads(self) -> dict[tuple, list[torch.Tensor]]:
        """This rank's gradient shards grouped by (device, dtype), for the multi-tensor (foreach) kernels: one
        launch per group instead of several per parameter (a QLoRA model has hundreds of LoRA tensors, and a
        sharded step is bound by host time; docs/benchmarks.md)."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
                if g.numel():
                    groups.setdefault((g.device, g.dtype), []).append(g.detach())
        return groups

    def _grad_norm(self, groups) -> torch.Tensor:
        import torch.distributed as dist
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for grads in groups.values():
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            sq += torch.stack(norms).pow(2).sum().to(self.device)
        dist.all_reduce(sq)
        return sq.sqrt()

    def clip_gradients(self) -> torch.Tensor:
        """The norm over every rank's gradient shards; clipping scales each local shard by the same factor."""
        groups = self._local_grads()
        norm = self._grad_norm(groups)
        clip = self.cfg.train.grad_clip
        if clip > 0:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for (device, _), grads in groups.items():
                torch._foreach_mul_(grads, coef.to(device))
        return norm

    def _reshard(self) -> None:
        """Put every FSDP unit back to its sharded parameters. With zero_stage 2 (reshard_after_forward=False) a
        forward without a backward (eval) leaves units holding their gathered parameters, registered on the module
        in place of the sharded ones the optimizer steps."""
        for m in self.model.modules():
            if _is_fsdp_module(m):
                m.reshard()

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        self._reshard()
        return super().named_trainable()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        self._reshard()
        out = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                t = p.full_tensor() if _is_dtensor(p) else p
                out[n] = t.detach().to("cpu", copy=True)
        return out

    def local_param_bytes(self) -> int:
        # counts offloaded shards too: they are this rank's share, wherever they live
        return sum(tensor_local_bytes(p) for p in self.model.parameters())
