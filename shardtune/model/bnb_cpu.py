"""Keeps bitsandbytes' 4-bit layers in the layout shardtune quantized them to: turns off the in-place "packed for CPU"
weight conversion that `Linear4bit.forward` does on CPUs with AVX512-BF16.

Why: bitsandbytes (read and measured on 0.50.2) gives every `Linear4bit` an attribute `support_avx512bf16_for_cpu`
(set from the CPU in `__init__`). When it is true and a forward runs on CPU with the module in eval mode and an input
that does not require grad (any `model.eval()` + `torch.no_grad()`: evaluation, generation, a logits check), the
forward rewrites `weight.data` and its QuantState in place into a [N, K/2] uint8 layout with bf16 absmax. Measured here:
  - it asserts `N % 32 == 0`, so a layer with out_features not divisible by 32 (the tiny test models' MLP, 176)
    raises "N must be divisible by block_n" on the first eval forward;
  - where it succeeds, every later CPU forward (also in train mode) goes through `gemv_4bit`, which has no autograd
    kernel: after one eval pass, training silently gets no gradient through the base weight to the layer's input, and
    outputs move (by 7e-3 on a 64x64 NF4 layer: bf16 absmax);
  - `state_dict()` converts back, but re-quantizes the double-quant constants, so they no longer equal the loaded ones.
The switch is the per-module attribute, read on every forward; setting it to False keeps the ordinary dequantize
path (the one training uses) for every forward, on every CPU. It must run before the first eval forward.
"""

from __future__ import annotations

from torch import nn


def disable_cpu_weight_packing(model: nn.Module) -> int:
    """Turn off bitsandbytes' in-place CPU weight packing on every Linear4bit under `model`; returns how many.

    A no-op (0) when bitsandbytes is not installed, the model has no 4-bit layers, or the installed bitsandbytes has no
    such fast path (no `support_avx512bf16_for_cpu` attribute)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            count += 1
    return count
