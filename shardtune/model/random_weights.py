"""Random stand-ins for checkpoint tensors, generated per row chunk on the load device: a 70B-shaped model can be
built directly in 4-bit from config.json alone (benchmarks), through the same loader a real checkpoint takes."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class RandomEntry:
    """A stand-in checkpoint tensor with random values, generated on demand (per row chunk, on the load device): lets
    benchmarks build a 70B-shaped model directly in 4-bit without a checkpoint on disk. Norm weights are ones,
    biases zeros, everything else N(0, std); values are reproducible per (seed, key, rows)."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, std: float = 0.02):
        self.key, self.shape, self.dtype, self.seed, self.std = key, tuple(shape), dtype, seed, std
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()

    def read(self, start: Optional[int] = None, stop: Optional[int] = None, device=None, dtype=None) -> torch.Tensor:
        device = torch.device(device or "cpu")
        start = 0 if start is None or not self.shape else start
        stop = (self.shape[0] if self.shape else 0) if stop is None else stop
        shape = ((stop - start,) + self.shape[1:]) if self.shape else ()
        leaf = self.key.rsplit(".", 2)
        if len(self.shape) == 1 and "norm" in self.key:
            out = torch.ones(shape, device=device)
        elif leaf[-1] == "bias":
            out = torch.zeros(shape, device=device)
        else:
            g = torch.Generator(device=device)
            g.manual_seed((self.seed * 1_000_003 + sum(map(ord, self.key)) * 7919 + start) % (2**63))
            out = torch.randn(shape, generator=g, device=device).mul_(self.std)
        return out.to(dtype or self.dtype)


def random_entries(model: nn.Module, dtype: torch.dtype, seed: int = 0, std: float = 0.02) -> list[RandomEntry]:
    """RandomEntry for every weight a checkpoint of `model` (a fresh skeleton, before LoRA) would hold: persistent
    state-dict names, tied weights once, quantized linears in their unquantized [out, in] shape."""
    import bitsandbytes as bnb
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        for a, t in list(module._parameters.items()) + [(b, module._buffers[b]) for b in module._buffers
                                                         if b not in module._non_persistent_buffers_set]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            shape = tuple(t.shape)
            if a == "weight" and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                shape = (module.out_features, module.in_features)
            out.append(RandomEntry(f"{mname}.{a}" if mname else a, shape, dtype, seed, std))
    return out
