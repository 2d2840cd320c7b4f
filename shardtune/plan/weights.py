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


def kbit_upcast(setup: TrainSetup) -> bool:
    """peft's prepare_model_for_kbit_training (HF stack, 4-bit/8-bit bases) casts every non-quantized parameter to
    fp32: norms, embeddings, the LM head. The QLoRA paper's script then casts embeddings and head back to bf16 along
    with the LoRA weights (lora_dtype bf16), keeping only the norms in fp32."""
    return setup.stack == "hf" and setup.method in ("qlora", "int8") and setup.kbit_upcast


def lora_elem(setup: TrainSetup) -> int:
    """Bytes per LoRA weight (and its gradient): fp32, or the compute dtype for the QLoRA paper's bf16 LoRA."""
    return setup.elem if setup.lora_dtype != "fp32" else 4


def fp32_residual(setup: TrainSetup) -> bool:
    """The residual stream is fp32: fp32 masters under autocast (full), or fp32 embeddings from the HF stack's
    upcast (the embedding's output is fp32 and every residual add keeps it so)."""
    return fp32_autocast(setup) or (kbit_upcast(setup) and setup.lora_dtype == "fp32")


def weight_bytes(shape: ModelShape, setup: TrainSetup) -> WeightBytes:
    e = 4 if (kbit_upcast(setup) and setup.lora_dtype == "fp32") else base_param_elem(setup)
    norm_e = 4 if kbit_upcast(setup) else e
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
    dense += shape.norm_params_per_layer * norm_e
    rotary_buffers = 2 * (shape.head_dim // 2) * 4              # inv_freq + original_inv_freq, fp32
    root = shape.params_embeddings * e + shape.final_norm_params * norm_e + rotary_buffers
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


def optimizer_bytes_per_param(optimizer: str, param_elem: int = 4) -> int:
    """torch AdamW keeps m and v in the parameter's dtype (8 B for fp32 parameters); bitsandbytes 8-bit AdamW keeps
    them in 8 bits (2 B), its 32-bit (paged) AdamW in fp32 (8 B)."""
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2
    if optimizer == "paged_adamw_32bit":
        return 8
    return 2 * param_elem
