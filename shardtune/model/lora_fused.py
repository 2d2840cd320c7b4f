"""LoRA with its dropout regenerated in backward instead of stored.

peft computes `lora_B(lora_A(dropout(x))) * scaling`: autograd keeps, for every adapted linear, the dropped-out copy of
x (compute dtype) and dropout's mask, although x itself is already kept (or cheap to keep once) and the mask is a
function of a random seed. On Llama-3-8B with all-linear LoRA that is 117 KB per token per layer, more than half of
what a decoder layer saves (docs/benchmarks.md, issue 17). `LoraDropoutMatmul` keeps x (shared by the q/k/v or
gate/up paths that read the same tensor), the rank-r intermediate and a seed, and regenerates mask and x*mask in
backward: the same function of the same random draw, with autograd keeping a third of the bytes.

The seed is drawn from torch's CPU generator (no device sync; saved and restored with a checkpoint, and replayed by
gradient checkpointing, which restores the CPU RNG state for its recompute). `fuse_lora(model)` patches each eligible
peft LoRA layer's forward on the instance; layers outside the plain case (DoRA or other variants, several active
adapters, merged weights, mixed-batch adapter names, eval mode) take peft's own forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

_SEED_HIGH = 2 ** 62


def _keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device=like.device)
    g.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=g)


class LoraDropoutMatmul(torch.autograd.Function):
    """y = ((x * mask / (1 - p)) @ A.T @ B.T) * scaling, in x's dtype, with the mask regenerated from `seed`."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scaling: float, p: float, seed: int):
        xd = x * _keep_mask(x, p, seed).mul_(1.0 / (1.0 - p)) if p > 0 else x
        a, b = weight_a.to(x.dtype), weight_b.to(x.dtype)
        h = xd @ a.t()
        y = (h @ b.t()) * scaling
        ctx.save_for_backward(x, h, weight_a, weight_b)
        ctx.scaling, ctx.p, ctx.seed = scaling, p, seed
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h, weight_a, weight_b = ctx.saved_tensors
        p, s = ctx.p, ctx.scaling
        a, b = weight_a.to(x.dtype), weight_b.to(x.dtype)
        gys = gy.to(x.dtype) * s
        gy2 = gys.reshape(-1, gys.shape[-1])
        grad_b = (gy2.t() @ h.reshape(-1, h.shape[-1])).to(weight_b.dtype) if ctx.needs_input_grad[2] else None
        dh = gys @ b
        mask = _keep_mask(x, p, ctx.seed).mul_(1.0 / (1.0 - p)) if p > 0 else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            xd = x * mask if mask is not None else x
            grad_a = (dh.reshape(-1, dh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1])).to(weight_a.dtype)
            del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = dh @ a
            if mask is not None:
                grad_x.mul_(mask)
        return grad_x, grad_a, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _plain_adapter(layer, kwargs) -> str | None:
    """The single active plain-LoRA adapter of `layer` for this call, or None when peft's forward must run."""
    if (not layer.training or layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None
            or not torch.is_grad_enabled()):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False):
        return None
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound to each patched layer (a bound method, so deepcopy and pickling rebind it to the copy)."""
    name = _plain_adapter(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    result = self.base_layer(x, *args, **kwargs)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    seed = int(torch.randint(0, _SEED_HIGH, (1,)).item()) if p > 0 else 0
    xc = x.to(_compute_dtype(x, weight_a))
    lora = LoraDropoutMatmul.apply(xc, weight_a, weight_b, float(self.scaling[name]), p, seed)
    return result + lora.to(result.dtype)


def fuse_lora(model: nn.Module) -> int:
    """Patch every peft LoRA linear (plain, 4-bit, 8-bit) of `model`; returns how many were patched."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "base_layer"):
            continue
        if not isinstance(getattr(module, "lora_A", None), nn.ModuleDict) or getattr(module, "_shardtune_fused", False):
            continue
        if isinstance(module.get_base_layer(), (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        module.forward = types.MethodType(_fused_forward, module)
        module._shardtune_fused = True
        n += 1
    return n
