"""Bytes per GPU and per node of CPU RAM, by component, for one training setup, from the model shape alone.

The model is written for how shardtune runs (docs/planner.md derives every term): a transformers decoder with SDPA
attention; frozen base weights in the compute dtype, or bitsandbytes NF4/FP4 (storage dtype = compute dtype) or
LLM.int8; peft LoRA in fp32 under autocast; AdamW fp32 states on the trainable parameters; HF per-layer gradient
checkpointing; cross-entropy over logits upcast to fp32. Pure Python (no torch), so `shardtune plan` is instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardtune.model.shapes import LinearShape, ModelShape
from shardtune.hardware import GiB
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.setup import TrainSetup, fsdp_layers_per_unit

QUANT_BLOCK = 64          # bitsandbytes 4-bit block size (values per absmax)
NESTED_BLOCK = 256        # double quantization: absmax values per second-level fp32 absmax
NF4_CODE_BYTES = 16 * 4   # the 16-entry fp32 code table each 4-bit QuantState carries
NESTED_CODE_BYTES = 256 * 4  # the 256-entry fp32 dynamic map of the nested (8-bit) absmax
NESTED_OFFSET_BYTES = 4   # fp32 mean subtracted before the nested quantization
FUSED_CHUNK_TOKENS = 2048  # shardtune.train.loss.fused_loss_sum chunk without Liger


# ------------------------------------------------------------------------------------------------ weights

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


# ------------------------------------------------------------------------------------------------ activations

def activation_breakdown_per_token(shape: ModelShape, setup: TrainSetup,
                                   c: PlanConstants = DEFAULT_CONSTANTS) -> dict[str, float]:
    """Bytes autograd keeps per token for ONE decoder layer with no checkpointing (SDPA flash/efficient kernel,
    no padding mask). Keys name what is saved; docs/planner.md walks through the layer op by op."""
    e, h, I = setup.elem, shape.hidden, shape.intermediate
    qd, kvd = shape.q_dim, shape.kv_dim
    out: dict[str, float] = {}
    liger = setup.kernels == "liger"
    # transformers' RMSNorm upcasts its input to fp32 and keeps that copy for backward (4 B whatever the compute
    # dtype); Liger's keeps the input as is plus one fp32 rstd per row.
    out["norm inputs"] = shape.block_norms * norm_saved_per_token(shape, setup)
    # SDPA keeps q (after RoPE), k, v, the output and the fp32 log-sum-exp per head.
    out["attention q,k,v,out"] = e * (2 * qd + 2 * kvd) + 4 * shape.heads
    # gated MLP: act(gate) keeps gate's output; gate*up keeps act's output and up's output. Liger's SwiGLU keeps
    # only gate's and up's outputs (recomputes the activation in backward).
    out["mlp intermediates"] = ((2 if liger else 3) if shape.gated_mlp else 1) * e * I
    if setup.method == "full":
        if fp32_autocast(setup):
            # Every linear keeps its input for the weight gradient; under autocast each linear casts its fp32 input
            # itself (q, k, v: three copies); norms keep their fp32 output too (their weight is trained).
            n_attn_in = sum(1 for lin in shape.linears if lin.input_group == "attn_in")
            n_mlp_in = sum(1 for lin in shape.linears if lin.input_group == "mlp_in")
            out["linear inputs"] = e * h * (n_attn_in + n_mlp_in) + e * I   # o reuses SDPA's output
            out["norm outputs (fp32)"] = shape.block_norms * 4 * h
        else:
            # compute-dtype parameters: linears reading one tensor share it; norms keep their normalized input
            out["linear inputs"] = e * h * 2 + e * I
            out["norm outputs"] = shape.block_norms * e * h
        return out
    targeted = shape.targeted_linears(setup.lora_targets)
    # peft's plain Linear (method=lora) casts x to the fp32 LoRA dtype before dropout, and autocast casts it back
    # for lora_A: every LoRA path keeps its own compute-dtype copy. bitsandbytes layers (qlora, int8) skip that cast
    # under CUDA autocast, so lora_A keeps the very tensor the other linears read.
    own_copy = setup.method == "lora" and setup.autocast
    if setup.lora_dropout > 0:
        # dropout keeps its mask (bool on CUDA); lora_A keeps the dropped-out compute-dtype copy of its input
        mask = e if c.dropout_mask_bytes is None else c.dropout_mask_bytes
        out["lora inputs (dropout mask + copy)"] = sum((mask + e) * lin.in_features for lin in targeted)
    elif own_copy:
        out["lora inputs (cast copies)"] = sum(e * lin.in_features for lin in targeted)
    else:
        # lora_A keeps its input; linears reading the same tensor share it; o_proj's input is SDPA's saved output
        groups = {lin.input_group: lin.in_features for lin in targeted}
        out["lora inputs"] = sum(e * n for g, n in groups.items() if g != "attn_out")
    out["lora rank intermediates"] = sum(e * setup.lora_rank for _ in targeted)
    return out


def norm_saved_per_token(shape: ModelShape, setup: TrainSetup) -> float:
    if setup.kernels == "liger":
        return setup.elem * shape.hidden + 4
    return 4 * shape.hidden


def activation_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup,
                                     c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    return sum(activation_breakdown_per_token(shape, setup, c).values())


def first_layer_discount_per_token(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Without checkpointing the frozen embedding's output does not require grad, so layer 0 keeps neither its
    first norm's fp32 input nor the dropout masks of the linears reading that norm's output (HF only hooks the
    embedding to require grad when checkpointing is on)."""
    if setup.grad_ckpt or setup.method == "full":
        return 0.0
    e = setup.elem
    mask = e if c.dropout_mask_bytes is None else c.dropout_mask_bytes
    masks = 0.0
    if setup.lora_dropout > 0:
        masks = sum(mask * lin.in_features for lin in shape.targeted_linears(setup.lora_targets)
                    if lin.input_group == "attn_in")
    return norm_saved_per_token(shape, setup) + masks


def residual_elem(setup: TrainSetup) -> int:
    """Bytes per element of the residual stream: fp32 when fp32 master weights meet autocast (full), else compute."""
    return 4 if fp32_autocast(setup) else setup.elem


def checkpoint_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup) -> int:
    """With per-layer checkpointing only each layer's input hidden state is kept."""
    return residual_elem(setup) * shape.hidden


def shared_activation_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """Kept once for all layers: RoPE cos/sin, the final norm's fp32 input, input ids / labels / mask (int64)."""
    rope = 2 * setup.elem * shape.head_dim
    final_norm = norm_saved_per_token(shape, setup)
    batch = 3 * 8
    head_input = setup.elem * shape.hidden if setup.method == "full" or _lm_head_trained(setup) else 0
    return rope + final_norm + batch + head_input


def _lm_head_trained(setup: TrainSetup) -> bool:
    return any(m.rsplit(".", 1)[-1] in ("lm_head", "embed_out") for m in setup.modules_to_save)


def loss_peak_bytes(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """The loss spike at the start of backward.

    Full logits: the fp32 log-softmax output, its incoming gradient and the gradient it produces coexist
    (loss_bytes_per_logit = 12 B per logit of [tokens x vocab]). Fused loss with Liger: the labelled hidden states,
    the gradient Liger computes for them during the forward and one vocabulary chunk of ~tokens*hidden logits.
    Fused loss without Liger: the same spike as full logits, but for one checkpointed chunk of 2048 tokens."""
    T = setup.tokens
    if setup.fused_loss == "liger":
        return c.flce_hidden_copies * setup.elem * shape.hidden * T
    if setup.fused_loss == "chunked":
        return c.loss_bytes_per_logit * min(T, FUSED_CHUNK_TOKENS) * shape.vocab + setup.elem * shape.hidden * T
    return c.loss_bytes_per_logit * T * shape.vocab


def loss_forward_bytes(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """End of the forward: bf16 logits + their fp32 copy + the fp32 log-softmax output (or the fused equivalents)."""
    T = setup.tokens
    upcast = 4 if setup.elem != 4 else 0
    if setup.fused_loss == "liger":
        return c.flce_hidden_copies * setup.elem * shape.hidden * T
    if setup.fused_loss == "chunked":
        return (setup.elem + upcast + 4) * min(T, FUSED_CHUNK_TOKENS) * shape.vocab + setup.elem * shape.hidden * T
    return (setup.elem + upcast + 4) * T * shape.vocab


def backward_transient_bytes(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Inside one layer's backward: live gradient tensors plus the dequantized weight of the current linear."""
    per_token = (c.bwd_transient_mlp * setup.elem * shape.intermediate
                 + c.bwd_transient_hidden * residual_elem(setup) * shape.hidden)
    if setup.method == "lora" and setup.autocast:
        # peft's fp32 cast of the LoRA input turns its gradient fp32 too (one more through dropout's backward)
        widest = max((lin.in_features for lin in shape.targeted_linears(setup.lora_targets)), default=0)
        per_token += (2 if setup.lora_dropout > 0 else 1) * 4 * widest
    biggest = max(lin.weight_numel for lin in shape.linears)
    dequant = biggest * setup.elem if setup.method in ("qlora", "int8") else 0
    return per_token * setup.tokens + dequant


# ------------------------------------------------------------------------------------------------ the estimate

@dataclass
class MemoryEstimate:
    """Per-GPU bytes at the predicted peak, by component (they add up to `device_total`), and CPU RAM per node."""

    gpu: dict[str, int]
    peak_allocated: int
    peak_reserved: int
    device_total: int                 # reserved + CUDA context + NCCL: what nvidia-smi would show
    usage_vs_budget: int              # what must fit in `budget` (reserved only when a per-process cap is set)
    budget: int                       # usable GPU memory (board or cap) before the margin
    peak_phase: str
    phases: dict[str, int]            # allocated bytes of each candidate peak
    cpu: dict[str, int]               # per node
    cpu_total: int
    cpu_budget: int | None
    load_peak_cpu_per_rank: int
    load_peak_gpu: int
    weights: WeightBytes
    trainable_params: int
    activation_per_token_layer: float
    notes: list[str] = field(default_factory=list)
    cpu_ram_assumed: bool = False

    def fits(self, margin: float) -> bool:
        return self.usage_vs_budget <= (1 - margin) * self.budget and self.cpu_fits()

    def cpu_fits(self) -> bool:
        return self.cpu_budget is None or self.cpu_total <= 0.9 * self.cpu_budget

    def free_bytes(self, margin: float) -> int:
        return int((1 - margin) * self.budget - self.usage_vs_budget)

    def to_dict(self) -> dict:
        return {"gpu": dict(self.gpu), "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "device_total": self.device_total, "usage_vs_budget": self.usage_vs_budget, "budget": self.budget,
                "peak_phase": self.peak_phase, "phases": dict(self.phases), "cpu": dict(self.cpu),
                "cpu_total": self.cpu_total, "cpu_budget": self.cpu_budget,
                "load_peak_cpu_per_rank": self.load_peak_cpu_per_rank, "load_peak_gpu": self.load_peak_gpu,
                "weights_unsharded": {"quant_data": self.weights.quant_data, "quant_consts": self.weights.quant_consts,
                                      "layer_dense": self.weights.layer_dense, "root": self.weights.root},
                "trainable_params": self.trainable_params,
                "activation_bytes_per_token_layer": self.activation_per_token_layer,
                "cpu_ram_assumed": self.cpu_ram_assumed, "notes": list(self.notes)}


def _elem_of_dtype(name: str) -> int:
    return 4 if "32" in name else 2


def predict_memory(shape: ModelShape, setup: TrainSetup, hw, c: PlanConstants = DEFAULT_CONSTANTS) -> MemoryEstimate:
    """Per-GPU peak allocated / reserved memory and CPU RAM of `setup` on hardware `hw`."""
    N, e, L = setup.world_size, setup.elem, shape.layers
    w = weight_bytes(shape, setup)
    notes: list[str] = []

    # ---- base weights resident on each GPU, and what is gathered unsharded while computing.
    # FSDP2 and ZeRO-3 shard every parameter, the 4-bit data and its quantization constants included (shardtune
    # turns each Linear4bit into a ShardedLinear4bit whose constants are parameters). FSDP gathers in the compute
    # dtype (mixed-precision policy), so full fine-tuning's fp32 shards gather at half the bytes.
    offload_params = setup.offload_param or (setup.strategy == "fsdp" and setup.offload_optimizer)
    consts_sharded = setup.shards_params and c.quant_state_sharded
    gather_scale = setup.elem / 4 if (setup.method == "full" and setup.strategy == "fsdp") else 1.0
    head = (shape.vocab * shape.hidden + shape.final_norm_params) * base_param_elem(setup) * gather_scale
    gathered = 0.0
    if setup.shards_params:
        layer_gather = (w.per_layer if consts_sharded else w.per_layer - w.quant_consts / L) * gather_scale
        if setup.gathers_all_params:      # reshard_after_forward=False: every unit stays gathered until backward
            gathered = L * layer_gather + w.root * gather_scale
        else:                             # the unit in use + the prefetched one, and the output projection
            unit = fsdp_layers_per_unit(setup.fsdp_layers_per_unit, layer_gather, L) if setup.strategy == "fsdp" else 1
            gathered = min(c.fsdp_prefetch_layers * unit, L) * layer_gather + head
        share = 0.0 if offload_params else 1.0 / N
    else:
        share = 1.0
    consts_res = w.quant_consts * (share if consts_sharded else 1.0)
    data_res = w.quant_data * share
    dense_res = w.non_quantized * share
    gpu: dict[str, float] = {}
    if setup.method == "qlora":
        gpu["weights: 4-bit data"] = data_res
        gpu["weights: quant constants"] = consts_res
        gpu["weights: non-quantized"] = dense_res
    elif setup.method == "int8":
        gpu["weights: int8 data + scales"] = data_res + consts_res
        gpu["weights: non-quantized"] = dense_res
    elif setup.method == "full":
        gpu["weights (trainable)"] = dense_res
    else:
        gpu["weights: base (frozen)"] = dense_res

    # ---- trainable parameters, gradients, optimizer states
    P = trainable_params(shape, setup)
    obpp = optimizer_bytes_per_param(setup.optimizer)
    div = N if setup.shards_states else 1
    cpu_off: dict[str, float] = {}
    master = bucket = 0.0
    if setup.method != "full":
        if setup.strategy == "deepspeed":         # DeepSpeed casts the module (LoRA included) to the compute dtype
            gpu["LoRA weights"] = e * P * (1 / N if setup.zero_stage == 3 else 1)
        else:
            gpu["LoRA weights (fp32)"] = 4 * P * share
    grads = 4 * P / div
    states = obpp * P / div
    if setup.strategy == "deepspeed":
        master = 4 * P / N                        # ZeRO's fp32 master partition of the trainable parameters
        bucket = e * min(c.ds_reduce_bucket_elems or shape.hidden ** 2, P)
    elif setup.strategy == "ddp":
        bucket = 4 * P                            # DDP's reducer buckets hold a copy of every gradient
    elif setup.strategy == "fsdp":
        layer_trainable = P / L if setup.method != "full" else shape.params_per_layer
        bucket = 2 * 4 * layer_trainable          # a layer's unsharded fp32 grads before/while reduce-scattering
    offload_states = setup.offload_optimizer or (setup.strategy == "fsdp" and setup.offload_param)
    if offload_states:
        cpu_off["optimizer states (offloaded)"] = states * setup.gpus_per_node
        cpu_off["fp32 grads + masters (offloaded)"] = (grads + master) * setup.gpus_per_node
        states_gpu = grads_gpu = master_gpu = 0.0
    else:
        states_gpu, grads_gpu, master_gpu = states, grads, master
    if offload_params:
        cpu_off["weights (offloaded shards)"] = (w.total / N) * setup.gpus_per_node
    if master_gpu:
        gpu["fp32 master (ZeRO)"] = master_gpu
    if setup.strategy == "deepspeed" and setup.zero_stage == 3:
        gpu["ZeRO-3 runtime (measured, not derived)"] = c.ds_zero3_extra_bytes
    grads_key = "gradients (fp32)"
    gpu["optimizer states"] = states_gpu
    if bucket:
        gpu["comm: grad buckets"] = bucket
    # without a gradient sync between micro steps FSDP2 keeps the unsharded gradients (LoRA: small)
    grads_accum = 4 * P if (setup.strategy == "fsdp" and setup.grad_accum > 1) else grads_gpu

    static = sum(gpu.values())

    # ---- activations
    tokens = setup.tokens
    act_layer = activation_bytes_per_token_layer(shape, setup, c)
    shared = shared_activation_bytes_per_token(shape, setup) * tokens
    ckpt_layer = checkpoint_bytes_per_token_layer(shape, setup)
    saved_all = (act_layer * L - first_layer_discount_per_token(shape, setup, c)) * tokens
    if setup.grad_ckpt:
        saved_fwd = ckpt_layer * tokens * L
        saved_bwd = saved_fwd + act_layer * tokens
    else:
        saved_fwd = saved_bwd = saved_all
    loss = loss_peak_bytes(shape, setup, c)
    loss_fwd = loss_forward_bytes(shape, setup, c)
    transient = backward_transient_bytes(shape, setup, c)
    # autocast caches the compute-dtype copy of every trainable fp32 leaf weight for the whole forward (FSDP's
    # mixed-precision policy and DeepSpeed hand it compute-dtype parameters instead)
    lora_casts = (e * lora_params(shape, setup)
                  if setup.autocast and setup.method != "full" and setup.strategy in ("none", "ddp") else 0)
    full_casts = e * shape.matmul_params if fp32_autocast(setup) else 0
    head_cast = e * shape.vocab * shape.hidden if full_casts else 0
    layer_cast = e * shape.linear_weight_params_per_layer if full_casts else 0
    grads_layer = grads_gpu / L if setup.method == "full" else grads_gpu
    grads_prev = grads_accum if setup.grad_accum > 1 else 0.0   # earlier micro steps' grads already exist
    comm_gather = gathered

    phases = {
        # start of backward: every saved tensor + the cross-entropy backward spike
        "loss backward": static + saved_fwd + shared + loss + grads_prev + comm_gather
                         + (lora_casts if not setup.grad_ckpt else 0)
                         + (full_casts if not setup.grad_ckpt else head_cast),
        # backward of the last layer: its activations (recomputed with checkpointing) + gradient transients
        "layer backward": static + saved_bwd + shared + transient + comm_gather
                          + max(grads_prev, grads_layer)
                          + (lora_casts if not setup.grad_ckpt else 0)
                          + (full_casts if not setup.grad_ckpt else layer_cast + head_cast),
        # optimizer step: all gradients + states (activations freed)
        "optimizer step": static + grads_gpu,
    }
    if full_casts:
        phases["end of forward"] = static + saved_fwd + shared + full_casts + loss_fwd + grads_prev + comm_gather
    else:
        phases["end of forward"] = static + saved_fwd + shared + loss_fwd + grads_prev + comm_gather + lora_casts
    peak_phase = max(phases, key=phases.get)
    peak_alloc = phases[peak_phase]

    # components at the peak, in display order
    if peak_phase == "optimizer step":
        gpu[grads_key] = grads_gpu
    elif peak_phase == "loss backward":
        gpu[grads_key] = grads_prev
        gpu["activations"] = saved_fwd + shared
        gpu["logits / loss"] = loss
        gpu["autocast weight copies"] = (lora_casts if not setup.grad_ckpt else 0) + (
            full_casts if not setup.grad_ckpt else head_cast)
    elif peak_phase == "layer backward":
        gpu[grads_key] = max(grads_prev, grads_layer)
        gpu["activations"] = saved_bwd + shared
        gpu["backward transients"] = transient
        gpu["autocast weight copies"] = (lora_casts if not setup.grad_ckpt else 0) + (
            full_casts if not setup.grad_ckpt else layer_cast + head_cast)
    else:
        gpu[grads_key] = grads_prev
        gpu["activations"] = saved_fwd + shared
        gpu["logits / loss"] = loss_fwd
        gpu["autocast weight copies"] = full_casts or lora_casts
    if peak_phase != "optimizer step" and comm_gather:
        gpu["comm: gathered params (fsdp/zero3)"] = comm_gather

    reserved = (peak_alloc * (1 + c.alloc_frag_frac) + c.alloc_frag_layer_frac * act_layer * tokens
                + c.alloc_frag_min_bytes)
    if setup.strategy in ("fsdp", "deepspeed") and N > 1:
        reserved += c.shard_slack_bytes + c.shard_slack_loss_frac * loss
    gpu["allocator overhead (reserved - allocated)"] = reserved - peak_alloc
    fixed = c.cuda_context_bytes + (c.nccl_bytes if N > 1 else 0)
    gpu["CUDA context + NCCL"] = fixed
    device_total = reserved + fixed
    capped = getattr(hw, "memory_cap_bytes", None)
    usage = reserved if capped else device_total
    if capped:
        notes.append("per-process cap: only torch's reserved memory counts against it (context/NCCL lie outside)")

    # ---- CPU RAM per node
    cpu: dict[str, float] = {"processes (torch, CUDA, libraries)": c.cpu_base_per_rank_bytes * setup.gpus_per_node}
    cpu.update(cpu_off)
    cpu_total = sum(cpu.values())
    ckpt_elem = _elem_of_dtype(shape.checkpoint_dtype)
    largest = max(shape.vocab * shape.hidden, max(lin.weight_numel for lin in shape.linears))
    per_rank_weights = w.total * share
    load_cpu = c.cpu_base_per_rank_bytes + largest * ckpt_elem + per_rank_weights
    load_gpu = per_rank_weights + largest * max(e, base_param_elem(setup)) + fixed
    cpu_budget, assumed = hw.cpu_ram() if hasattr(hw, "cpu_ram") else (getattr(hw, "cpu_ram_bytes", None), False)
    if assumed and (setup.offload_optimizer or setup.offload_param):
        notes.append(f"CPU RAM per node assumed {cpu_budget / GiB:.0f} GiB (2x GPU memory); give --cpu-ram")
    if setup.offload_optimizer or setup.offload_param:
        notes.append("offloaded tensors live in pinned CPU memory (page-locked; cannot swap)")

    return MemoryEstimate(
        gpu={k: int(v) for k, v in gpu.items()}, peak_allocated=int(peak_alloc), peak_reserved=int(reserved),
        device_total=int(device_total), usage_vs_budget=int(usage), budget=int(hw.gpu_memory_bytes),
        peak_phase=peak_phase, phases={k: int(v) for k, v in phases.items()},
        cpu={k: int(v) for k, v in cpu.items()}, cpu_total=int(cpu_total), cpu_budget=cpu_budget,
        load_peak_cpu_per_rank=int(load_cpu), load_peak_gpu=int(load_gpu), weights=w, trainable_params=P,
        activation_per_token_layer=act_layer, notes=notes, cpu_ram_assumed=assumed)
