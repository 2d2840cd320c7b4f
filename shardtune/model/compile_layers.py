"""`train.compile`: torch.compile each decoder layer of a one-process CUDA run.

Measured on one H200 (docs/benchmarks.md, round three): no gain at micro batch 4 without checkpointing (13,790
against 13,832 tokens/s; 7 graphs, Liger's dispatch is a `torch.compiler.disable`d break), and with fused LoRA it
fails to trace, so that combination runs eagerly with one line.

Compiling layer by layer keeps graphs small and identical across layers (one compile serves all of them), and
leaves the loss and the optimizer outside. bitsandbytes' 4-bit matmul and peft's LoRA run inside the compiled
layer; where dynamo cannot trace them it breaks the graph and runs them eagerly (`TORCH_LOGS=graph_breaks` lists
the breaks). Sharded engines wrap layers with their own hooks and are left uncompiled.
"""

from __future__ import annotations

from torch import nn


def compile_layers(model: nn.Module, device, strategy: str, fused_lora: int = 0) -> str:
    """Compile in place; returns the line the run prints."""
    if device.type != "cuda":
        return "compile: train.compile needs CUDA; running eagerly"
    if fused_lora:
        # measured on the H200 (bench/results/speed3_h200.json): dynamo's fake-tensor pass gives fused LoRA's output
        # the flattened shape, so the residual add fails to trace (torch 2.11)
        return "compile: not applied with train.fused_lora (dynamo cannot trace it); running eagerly"
    if strategy not in ("none",):
        return f"compile: not applied under parallel.strategy={strategy} (one-process runs only); running eagerly"
    from shardtune.model.load import checkpointed_blocks
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = checkpointed_blocks(base)
    import torch._dynamo
    cfg = torch._dynamo.config
    # one graph should serve every layer; if a layer's guards differ (an int attribute read in forward), each layer
    # recompiles once, and past the default limit (8) dynamo would silently run the rest eagerly
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), len(blocks) + 8))
    for block in blocks:
        block.compile(dynamic=False)
    return f"compile: {len(blocks)} decoder layers compiled with torch.compile (first steps compile)"
