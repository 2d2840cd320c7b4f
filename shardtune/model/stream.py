"""Load a checkpoint bigger than one GPU and than CPU RAM in one call: meta skeleton, LoRA, an engine's sharding,
then the weights streamed in and quantized on load, each rank keeping its own part.

The one-process path (`shardtune.model.load.build_model`) calls `from_pretrained`, which needs the whole model on one
device. Here the model is built on the meta device (no memory, `skeleton`), LoRA is added to that skeleton, a sharding
engine may shard it (FSDP2 `fully_shard` works on meta parameters), and only then are the weights streamed in
(`materialize`): each checkpoint tensor is read a few MiB at a time from the safetensors file (`checkpoint`), cast to
the compute dtype, moved to the device, quantized there (NF4/FP4 or LLM.int8), handed to a `place` callback that keeps
only this rank's part (engines implement it in shardtune.parallel.placement), and freed. Host memory therefore holds
one chunk at a time; device memory one tensor plus what the rank keeps.

The result (types, names, dtypes, 4-bit data and quantization constants, LoRA initialisation) equals what
`build_model` produces with `from_pretrained` + BitsAndBytesConfig; tests/model/test_stream_equivalence.py checks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from shardtune.model.bnb_cpu import disable_cpu_weight_packing
from shardtune.model.materialize import PlaceFn, materialize
from shardtune.model.random_weights import random_entries
from shardtune.model.skeleton import add_lora_to_skeleton, build_skeleton


def build_streamed_model(cfg, model_dir: Path, device: torch.device, dtype: torch.dtype,
                         place: Optional[PlaceFn] = None, shard: Optional[Callable[[nn.Module], object]] = None,
                         chunk_bytes: Optional[int] = None, random_init: bool = False) -> nn.Module:
    """The model build_model returns (same types, names, dtypes, bit-exact 4-bit data, same LoRA init for the same
    seed), built without ever holding the whole checkpoint: skeleton -> LoRA on the skeleton -> `shard(model)` (a
    sharding engine's wrapper, optional) -> stream the weights in through `place`. The LoadReport is attached as
    `model.load_report`. random_init=True needs only config.json: weights are random (RandomEntry), generated and
    quantized chunk by chunk on `device` (benchmarks of shapes whose checkpoint would not fit on disk)."""
    from shardtune.model.load import enable_checkpointing
    device = torch.device(device)
    model = build_skeleton(cfg, model_dir, dtype)
    entries = None
    if random_init:
        load_dtype = torch.float32 if cfg.train.method == "full" else dtype
        entries = random_entries(model, load_dtype, seed=cfg.train.seed)
    if cfg.train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora_to_skeleton(model, cfg, device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.train.checkpoint_layers, cfg.train.checkpoint_policy)
    if shard is not None:
        wrapped = shard(model)
        model = wrapped if wrapped is not None else model
    model.load_report = materialize(model, model_dir, cfg, device, dtype, place=place, chunk_bytes=chunk_bytes,
                                    entries=entries)
    disable_cpu_weight_packing(model)  # else a CPU eval forward repacks 4-bit weights in place (see bnb_cpu)
    return model
