"""Weight and trainable-state sizes from the model shape: bitsandbytes' 4-bit / int8 storage with its quantization
constants, the base weights split the way sharding treats them, LoRA and modules_to_save parameters, optimizer
bytes per parameter. Pure Python (no torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardtune.model.shapes import LinearShape, ModelShape
from shardtune.plan.setup import TrainSetup

QUANT_BLOCK = 64          # bitsandbytes 4-bit block size (values per absmax)
NESTED_BLOCK = 256        # double quantization: absmax values per second-level fp32 absmax
NF4_CODE_BYTES = 16 * 4   # the 16-entry fp32 code table each 4-bit QuantState carries
NESTED_CODE_BYTES = 256 * 4  # the 256-entry fp32 dynamic map of the nested (8-bit) absmax
NESTED_OFFSET_BYTES = 4   # fp32 mean subtracted before the nested quantization


def quantized_linear_bytes(lin: LinearShape, method: str, storage_elem: int, double_quant: bool) -> tuple[int, int]:
    """(data bytes, quantization-constant bytes) of one linear weight as bitsandbytes stores it."""
    n = lin.weight_numel
    if method == "qlora":
        packed = (n + 1) // 2                                    # two 4-bit values per byte
        data = math.ceil(packed / storage_elem) * storage_elem   # held in a tensor of the storage dtype
        blocks = math.ceil(n / QUANT_BLOCK)
        if double_quant:
            consts = blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_CODE_BYTES + NESTED_OFFSET_BYTES
        else:
            consts = blocks * 4
        return data, consts + NF4_CODE_BYTES
    if method == "int8":
        return n, lin.out_features * 4                          # int8 rows + one fp32 scale (SCB) per row
    raise ValueError(f"method {method} does not quantize")


@dataclass(frozen=True)
class WeightBytes:
    """Unsharded weight bytes of the whole model, split the way sharding treats them."""

    quant_data: int        # packed 4-bit / int8 weight data (0 for lora/full)
    quant_consts: int      # absmax / nested absmax / code tables / int8 row scales
    layer_dense: int       # non-quantized tensors inside the decoder layers (norms, biases; all of it for lora/full)
    root: int              # embeddings, lm_head, final norm, rotary buffers
    per_layer: int         # one decoder layer (data + consts + dense), what FSDP gathers per layer

    @property
    def total(self) -> int:
        return self.quant_data + self.quant_consts + self.layer_dense + self.root

    @property
    def non_quantized(self) -> int:
        return self.layer_dense + self.root


def base_param_elem(setup: TrainSetup) -> int:
    """Bytes per element of non-quantized base parameters: fp32 masters for full fine-tuning (except under
    DeepSpeed, which casts the module to the compute dtype and keeps its own fp32 copy), else the compute dtype."""
    if setup.method == "full" and setup.strategy != "deepspeed":
        return 4
    return setup.elem


def fp32_autocast(setup: TrainSetup) -> bool:
    """Full fine-tuning without a sharding engine keeps fp32 parameters and relies on autocast: every matmul casts
    its weight (cached for the whole forward) and the residual stream stays fp32. FSDP (mixed-precision policy)
    and DeepSpeed hand the forward compute-dtype parameters instead."""
    return setup.method == "full" and setup.strategy in ("none", "ddp") and setup.autocast


def weight_bytes(shape: ModelShape, setup: TrainSetup) -> WeightBytes:
    e = base_param_elem(setup)
    quantized = setup.method in ("qlora", "int8")
    data = consts = dense = 0
    for lin in shape.linears:
        if quantized:
            d, c = quantized_linear_bytes(lin, setup.method, setup.elem, setup.double_quant)
            data += d
            consts += c
        else:
            dense += lin.weight_numel * e
        if lin.bias:
            dense += lin.out_features * e
    dense += shape.norm_params_per_layer * e
    rotary_buffers = 2 * (shape.head_dim // 2) * 4              # inv_freq + original_inv_freq, fp32
    root = (shape.params_embeddings + shape.final_norm_params) * e + rotary_buffers
    L = shape.layers
    return WeightBytes(quant_data=L * data, quant_consts=L * consts, layer_dense=L * dense, root=root,
                       per_layer=data + consts + dense)


# ------------------------------------------------------------------------------------------------ trainable

def lora_params(shape: ModelShape, setup: TrainSetup) -> int:
    """r * (in + out) per targeted linear per layer (lora_A: r x in, lora_B: out x r)."""
    if setup.method == "full":
        return 0
    per_layer = sum(setup.lora_rank * (lin.in_features + lin.out_features)
                    for lin in shape.targeted_linears(setup.lora_targets))
    return shape.layers * per_layer


def modules_to_save_params(shape: ModelShape, setup: TrainSetup) -> int:
    """Trainable full copies peft makes of modules_to_save (lm_head / embed_tokens)."""
    n = 0
    for m in setup.modules_to_save:
        leaf = m.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_tokens", "wte", "embed_out"):
            n += shape.vocab * shape.hidden
    return 0 if setup.method == "full" else n


def trainable_params(shape: ModelShape, setup: TrainSetup) -> int:
    if setup.method == "full":
        return shape.params_total
    return lora_params(shape, setup) + modules_to_save_params(shape, setup)


def optimizer_bytes_per_param(optimizer: str) -> int:
    """AdamW keeps m and v in fp32 (8 B); bitsandbytes 8-bit AdamW keeps them in 8 bits (2 B)."""
    return 2 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
