"""Each memory term against numbers worked out by hand for a small Llama shape.

Shape: hidden 256, MLP 704, 4 layers, 4 heads of 64 (2 KV heads), vocab 1000, untied embeddings. Per layer the
linears are q 256x256, k 256x128, v 256x128, o 256x256, gate/up 256x704, down 704x256.
"""

from __future__ import annotations

import pytest

from shardtune.hardware import parse_gpus
from shardtune.model.shapes import shape_from_config
from shardtune.plan.constants import PlanConstants
from shardtune.plan.memory import (activation_bytes_per_token_layer, checkpoint_bytes_per_token_layer,
                                   loss_peak_bytes, lora_params, predict_memory, quantized_linear_bytes,
                                   shared_activation_bytes_per_token, weight_bytes)
from shardtune.plan.setup import TrainSetup

SHAPE = shape_from_config(dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                               tie_word_embeddings=False), name="small")
H100 = parse_gpus("1xH100")
Q = TrainSetup(method="qlora", precision="bf16", micro_batch=2, seq_len=512, lora_rank=8, lora_dropout=0.05,
               grad_ckpt=False)
LORA_PARAMS = 149_504   # per layer 8*(512 + 384 + 384 + 512 + 960 + 960 + 960) = 37,376; x 4 layers
NO_SLACK = PlanConstants(alloc_frag_frac=0.0, alloc_frag_layer_frac=0.0, alloc_frag_min_bytes=0)


def lin(name):
    return next(x for x in SHAPE.linears if x.name == name)


def test_nf4_double_quant_bytes_of_one_linear():
    # q_proj: 65,536 weights -> 32,768 bytes packed; 1,024 blocks of 64 -> 1,024 uint8 absmax + 4 fp32 nested
    # absmax (one per 256 blocks) + 256-entry fp32 nested code (1,024 B) + fp32 offset (4 B) + 16-entry NF4 code (64 B)
    assert quantized_linear_bytes(lin("q_proj"), "qlora", 2, True) == (32_768, 1_024 + 16 + 1_024 + 4 + 64)
    # gate_proj: 180,224 weights -> 90,112 B; 2,816 blocks -> 11 nested blocks
    assert quantized_linear_bytes(lin("gate_proj"), "qlora", 2, True) == (90_112, 2_816 + 44 + 1_024 + 4 + 64)
    # without double quantization: one fp32 absmax per block + the NF4 code
    assert quantized_linear_bytes(lin("q_proj"), "qlora", 2, False) == (32_768, 1_024 * 4 + 64)
    # int8: one byte per weight + an fp32 scale per output row
    assert quantized_linear_bytes(lin("q_proj"), "int8", 2, False) == (65_536, 256 * 4)


def test_packed_data_is_rounded_to_the_storage_dtype():
    odd = type(lin("q_proj"))("x.odd", "q", 3, 5)   # 15 values -> 8 packed bytes -> 2 fp32 elements = 8 B
    assert quantized_linear_bytes(odd, "qlora", 4, True)[0] == 8
    assert quantized_linear_bytes(odd, "qlora", 2, True)[0] == 8


def test_whole_model_weight_bytes_qlora():
    w = weight_bytes(SHAPE, Q)
    assert w.quant_data == 4 * 737_280 // 2                    # 737,280 linear weights per layer, 4 bits each
    assert w.quant_consts == 4 * (2_132 + 1_612 + 1_612 + 2_132 + 3 * 3_952)
    assert w.layer_dense == 4 * 2 * 256 * 2                    # two RMSNorm weights per layer in bf16
    # embed + lm_head (1000 x 256 each) + final norm in bf16, + inv_freq and original_inv_freq (32 fp32 each)
    assert w.root == (2 * 256_000 + 256) * 2 + 2 * 32 * 4


def test_weight_bytes_lora_and_full():
    total_params = SHAPE.params_total
    assert total_params == 4 * (737_280 + 512) + 512_256
    assert weight_bytes(SHAPE, Q.replace(method="lora")).total == total_params * 2 + 256
    assert weight_bytes(SHAPE, Q.replace(method="full")).total == total_params * 4 + 256


def test_lora_parameter_count():
    assert lora_params(SHAPE, Q) == LORA_PARAMS
    only_qv = Q.replace(lora_targets=("q_proj", "v_proj"))
    assert lora_params(SHAPE, only_qv) == 4 * 8 * (512 + 384)


def test_saved_activations_per_token_per_layer():
    # fp32 norm inputs 2*4*256 = 2,048; SDPA q,k,v,out 2*(256+128+128+256) = 1,536 + fp32 lse 4*4 = 16;
    # SwiGLU gate out, act out, up out 3*2*704 = 4,224; LoRA dropout mask (1 B) + bf16 copy per linear input:
    # 3*(5*256 + 256 + 704) = 6,720; LoRA A outputs 7*2*8 = 112
    assert activation_bytes_per_token_layer(SHAPE, Q) == 2_048 + 1_552 + 4_224 + 6_720 + 112
    # Liger: bf16 norm input + fp32 rstd (2*(512+4)); SwiGLU keeps only gate and up outputs (2*2*704)
    assert activation_bytes_per_token_layer(SHAPE, Q.replace(kernels="liger")) == 1_032 + 1_552 + 2_816 + 6_720 + 112
    # no dropout, 4-bit base: lora_A keeps the tensor the base linear reads; q/k/v share one, gate/up another,
    # o's input is SDPA's saved output: 2*(256 + 256 + 704)
    assert activation_bytes_per_token_layer(SHAPE, Q.replace(lora_dropout=0.0)) == 2_048 + 1_552 + 4_224 + 2_432 + 112
    # no dropout, bf16 base (peft casts every LoRA input to fp32 and back: one copy per linear) 2*2,240
    assert activation_bytes_per_token_layer(SHAPE, Q.replace(method="lora", lora_dropout=0.0)) == \
        2_048 + 1_552 + 4_224 + 4_480 + 112


def test_checkpoint_boundaries_and_shared_and_loss():
    assert checkpoint_bytes_per_token_layer(SHAPE, Q) == 2 * 256
    # RoPE cos+sin 2*2*64, final norm fp32 input 4*256, ids/labels/mask 3*8
    assert shared_activation_bytes_per_token(SHAPE, Q) == 256 + 1_024 + 24
    assert loss_peak_bytes(SHAPE, Q) == 12 * 1_024 * 1_000
    assert loss_peak_bytes(SHAPE, Q.replace(fused_loss="liger")) == 4 * 2 * 256 * 1_024
    assert loss_peak_bytes(SHAPE, Q.replace(fused_loss="chunked", micro_batch=8)) == 12 * 2_048 * 1_000 + 2 * 256 * 4_096


def test_peak_composition_with_checkpointing():
    st = Q.replace(grad_ckpt=True)
    m = predict_memory(SHAPE, st, H100, NO_SLACK)
    weights = 4 * 368_640 + 77_376 + 4_096 + 1_024_768
    static = weights + 4 * LORA_PARAMS + 8 * LORA_PARAMS          # fp32 LoRA weights + AdamW m and v
    loss_phase = static + 4 * 512 * 1_024 + 1_304 * 1_024 + 12 * 1_024 * 1_000
    assert m.phases["loss backward"] == loss_phase
    assert m.phases["optimizer step"] == static + 4 * LORA_PARAMS  # + fp32 gradients
    # last layer's backward: boundaries + that layer recomputed (14,656 B/token) + gradient transients
    # (1 x 2*704 + 1.5 x 2*256 per token) + the dequantized bf16 gate/up/down weight (704*256*2) + the fp32 LoRA
    # gradients (counted whole: they are small, and with accumulation they all exist)
    layer_phase = (static + 4 * 512 * 1_024 + 1_304 * 1_024 + 14_656 * 1_024 + 2_176 * 1_024 + 360_448
                   + 4 * LORA_PARAMS)
    assert m.phases["layer backward"] == layer_phase
    assert m.peak_phase == "layer backward" and m.peak_allocated == layer_phase == m.peak_reserved
    assert m.gpu["weights: 4-bit data"] == 4 * 368_640 and m.gpu["optimizer states"] == 8 * LORA_PARAMS


def test_without_checkpointing_every_layer_is_kept():
    m = predict_memory(SHAPE, Q, H100, NO_SLACK)
    ckpt = predict_memory(SHAPE, Q.replace(grad_ckpt=True), H100, NO_SLACK)
    per_layer = 14_656 * 1_024
    # layer 0 keeps neither its first norm's fp32 input (4*256) nor q/k/v's dropout masks (3*256): its input
    # (the frozen embedding's output) does not require grad without checkpointing
    saved = 4 * per_layer - (1_024 + 768) * 1_024
    assert m.phases["loss backward"] - ckpt.phases["loss backward"] == saved - 4 * 512 * 1_024 + 2 * LORA_PARAMS
    # (+ the bf16 autocast copies of the LoRA weights, kept for backward when nothing is recomputed)


def test_reserved_adds_allocator_slack():
    c = PlanConstants(alloc_frag_frac=0.1, alloc_frag_layer_frac=0.5, alloc_frag_min_bytes=1000)
    m = predict_memory(SHAPE, Q, H100, c)
    assert m.peak_reserved == int(m.peak_allocated * 1.1 + 0.5 * 14_656 * 1_024 + 1000)
    assert m.device_total == m.peak_reserved + c.cuda_context_bytes       # one GPU: no NCCL buffers


def test_sharding_divides_weights_and_states():
    P = LORA_PARAMS
    fsdp = predict_memory(SHAPE, Q.replace(strategy="fsdp", world_size=4, gpus_per_node=4), parse_gpus("4xH100"))
    assert fsdp.gpu["weights: 4-bit data"] == 4 * 368_640 / 4
    assert fsdp.gpu["weights: quant constants"] == 77_376 // 4
    assert fsdp.gpu["LoRA weights (fp32)"] == 4 * P // 4 and fsdp.gpu["optimizer states"] == 8 * P // 4
    z2 = predict_memory(SHAPE, Q.replace(strategy="deepspeed", zero_stage=2, world_size=4, gpus_per_node=4),
                        parse_gpus("4xH100"))
    assert z2.gpu["weights: 4-bit data"] == 4 * 368_640              # ZeRO-2 replicates the parameters
    assert z2.gpu["fp32 master (ZeRO)"] == 4 * P // 4 and z2.gpu["optimizer states"] == 8 * P // 4
    assert z2.gpu["LoRA weights"] == 2 * P                           # DeepSpeed runs the module in bf16
    ddp = predict_memory(SHAPE, Q.replace(strategy="ddp", world_size=2, gpus_per_node=2), parse_gpus("2xH100"))
    assert ddp.gpu["comm: grad buckets"] == 4 * P and ddp.gpu["optimizer states"] == 8 * P


def test_fsdp_units_of_several_layers_gather_more():
    hw = parse_gpus("2xH100")
    one = predict_memory(SHAPE, Q.replace(strategy="fsdp", world_size=2, gpus_per_node=2, fsdp_layers_per_unit=1), hw)
    two = predict_memory(SHAPE, Q.replace(strategy="fsdp", world_size=2, gpus_per_node=2, fsdp_layers_per_unit=2), hw)
    key = "comm: gathered params (fsdp/zero3)"
    layer = weight_bytes(SHAPE, Q).per_layer
    assert two.gpu[key] - one.gpu[key] == pytest.approx(min(4, SHAPE.layers) * layer - 2 * layer)
    assert two.gpu["weights: 4-bit data"] == one.gpu["weights: 4-bit data"]  # what rests on each GPU is unchanged


def test_auto_pairs_small_layers_only():
    from shardtune.plan.setup import FSDP_PAIR_MAX_BYTES, fsdp_layers_per_unit
    assert fsdp_layers_per_unit(0, FSDP_PAIR_MAX_BYTES / 2, 32) == 2        # an 8B 4-bit layer is ~113 MB
    assert fsdp_layers_per_unit(0, FSDP_PAIR_MAX_BYTES / 2 + 1, 80) == 1    # a 70B 4-bit layer is ~430 MB
    assert fsdp_layers_per_unit(0, 10, 1) == 1                               # nothing to pair
    assert fsdp_layers_per_unit(3, 10**12, 32) == 3 and fsdp_layers_per_unit(8, 10, 4) == 4  # explicit, capped
    hw = parse_gpus("2xH100")
    auto = predict_memory(SHAPE, Q.replace(strategy="fsdp", world_size=2, gpus_per_node=2), hw)
    two = predict_memory(SHAPE, Q.replace(strategy="fsdp", world_size=2, gpus_per_node=2, fsdp_layers_per_unit=2), hw)
    assert auto.gpu == two.gpu                                               # the test model's layers are small


def test_offload_moves_states_and_parameters_to_cpu():
    hw = parse_gpus("4xH100")
    st = Q.replace(strategy="deepspeed", zero_stage=3, world_size=4, gpus_per_node=4, offload_optimizer=True)
    m = predict_memory(SHAPE, st, hw)
    assert m.gpu["optimizer states"] == 0
    assert m.cpu["optimizer states (offloaded)"] == 8 * LORA_PARAMS / 4 * 4
    both = predict_memory(SHAPE, st.replace(offload_param=True), hw)
    assert both.gpu["weights: 4-bit data"] == 0
    # the frozen 4-bit base in pinned partitions: at least its bytes, at most twice (power-of-two blocks)
    pinned = both.cpu["weights (offloaded partitions, pinned: power-of-two blocks)"]
    assert weight_bytes(SHAPE, Q).total <= pinned < 2 * weight_bytes(SHAPE, Q).total


def test_full_fine_tuning_is_16_bytes_per_parameter_at_the_step():
    st = TrainSetup(method="full", micro_batch=1, seq_len=128, grad_ckpt=True)
    m = predict_memory(SHAPE, st, H100, NO_SLACK)
    n = SHAPE.params_total
    assert m.phases["optimizer step"] == (4 + 4 + 8) * n + 256       # fp32 weights, grads, m, v (+ rotary buffers)
    assert predict_memory(SHAPE, st.replace(optimizer="adamw_8bit"), H100, NO_SLACK).phases["optimizer step"] == \
        (4 + 4 + 2) * n + 256


def test_invalid_combinations_are_named():
    assert "offload" in Q.replace(offload_optimizer=True).invalid_reason()
    assert "stage 3" in Q.replace(strategy="deepspeed", zero_stage=2, offload_param=True,
                                  offload_optimizer=True, world_size=2).invalid_reason()
    assert "int8" in Q.replace(method="int8", strategy="fsdp", world_size=2).invalid_reason()
    assert Q.replace(strategy="fsdp", world_size=2, offload_param=True).invalid_reason() is None


@pytest.mark.parametrize("gpus,fits", [("1xH100", True), ("1x4GB", False)])
def test_fits_against_the_budget_with_margin(gpus, fits):
    m = predict_memory(SHAPE, Q.replace(micro_batch=256), parse_gpus(gpus))
    assert m.fits(0.1) is fits
    assert m.usage_vs_budget == m.device_total
