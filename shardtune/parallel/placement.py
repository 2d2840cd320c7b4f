"""Where streamed weights land under FSDP2: each rank keeps its Shard(0) chunk as a DTensor (of the packed 4-bit
storage, and of `ShardedLinear4bit`'s quantization constants), and parameters that were not streamed follow the
streamed ones to the offload device. The loader (shardtune.model.materialize) calls this through its `Placement`
protocol and never imports it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from shardtune.errors import ModelError
from shardtune.model.materialize import ConstantsParam, Placement


def local_chunk(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's piece of `full` under DTensor placements (Shard(d) = torch.chunk along d, ranks past the last
    chunk get an empty piece, as distribute_tensor and FSDP2 do), copied so `full` can be freed."""
    from torch.distributed.tensor import Replicate, Shard
    coord = mesh.get_coordinate()
    out = full
    for i, pl in enumerate(placements):
        if isinstance(pl, Shard) and type(pl) is Shard:
            pieces = torch.chunk(out, mesh.size(i), dim=pl.dim)
            out = pieces[coord[i]] if coord[i] < len(pieces) else out.narrow(pl.dim, out.size(pl.dim), 0)
        elif not isinstance(pl, Replicate):
            raise ModelError(f"streamed loading cannot place a parameter with placement {pl}; shard with Shard(dim) "
                             "or Replicate")
    return out.clone(memory_format=torch.contiguous_format)


class FsdpPlacement(Placement):
    """For a model already wrapped with FSDP2 `fully_shard` on the meta device: keeps this rank's chunk of every
    DTensor parameter as a DTensor on `device` (the CPU when FSDP offloads parameters; None: where it was loaded).
    Non-DTensor parameters (not managed by FSDP) are kept whole. FSDP2 re-pads the new local tensors in its lazy init
    (FSDPParam.reset_sharded_param)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device

    def __call__(self, name, module, param_name, value, quant_state):
        from torch.distributed.tensor import DTensor
        cur = module._parameters.get(param_name)
        if not isinstance(cur, DTensor):
            return value if self.device is None else value.to(self.device)
        local = local_chunk(value, cur.device_mesh, cur.placements)
        if self.device is not None:
            local = local.to(self.device)
        return _dtensor_like(cur, local)

    def constants_param(self, module: nn.Module) -> Optional[ConstantsParam]:
        # shard_model turned every Linear4bit into ShardedLinear4bit, whose constants are the parameter `quant_blob`
        from shardtune.parallel.quant4 import ShardedLinear4bit
        if isinstance(module, ShardedLinear4bit):
            return "quant_blob", module.layout.pack
        return None

    def after_load(self, model: nn.Module, load_device: torch.device) -> None:
        # LoRA weights were created on the load device before the weights were streamed to the offload device
        if self.device is not None and torch.device(self.device) != torch.device(load_device):
            rehome_params(model, torch.device(self.device))


def host_place() -> FsdpPlacement:
    """Every streamed tensor kept whole in CPU RAM (no DTensor parameters: nothing is sharded while loading); the
    DeepSpeed engine's `parallel.zero3_load=cpu` partitions from there."""
    return FsdpPlacement(torch.device("cpu"))


def fsdp_place(device: Optional[torch.device] = None) -> FsdpPlacement:
    """The placement the fsdp engine loads with (`device`: the CPU under parameter/optimizer offload)."""
    return FsdpPlacement(device)


def _dtensor_like(cur, local: torch.Tensor):
    """A DTensor with `cur`'s mesh, placements and global shape around `local`, on `local`'s device.
    DTensor.from_local would move a CPU shard back to a CUDA mesh's device, which breaks FSDP CPU offload."""
    from torch.distributed.tensor import DTensor
    if local.device.type == cur.device_mesh.device_type or local.is_meta:
        return DTensor.from_local(local, cur.device_mesh, cur.placements, run_check=False, shape=cur.shape,
                                  stride=cur.stride())
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    spec = DTensorSpec(cur.device_mesh, tuple(cur.placements),
                       tensor_meta=TensorMeta(cur.shape, cur.stride(), local.dtype))
    return DTensor(local, spec, requires_grad=False)


def rehome_params(model: nn.Module, device: torch.device) -> int:
    """Move every parameter not on `device` there. Before FSDP2's lazy init this is safe: it re-reads each
    parameter's local tensor then. Returns how many were moved."""
    from torch.distributed.tensor import DTensor
    moved = 0
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            local = p.to_local() if isinstance(p, DTensor) else p.data
            if local.device == device or local.device.type == "meta":
                continue
            if isinstance(p, DTensor):
                new = _dtensor_like(p, local.to(device))
            else:
                new = local.to(device)
            mod._parameters[pname] = nn.Parameter(new, requires_grad=p.requires_grad)
            moved += 1
    return moved
