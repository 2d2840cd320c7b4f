"""Step time, tokens/s and MFU of a training setup, from FLOPs, bytes moved and host overhead.

Per micro batch a GPU does matmuls (compute-bound), attention, 4-bit dequantization and element-wise kernels
(bandwidth-bound), while the host issues the kernels (eager PyTorch + peft + bitsandbytes cost tens of microseconds
per op: small batches are host-bound). Communication (FSDP/ZeRO gathers and reductions, DDP all-reduce) overlaps
with compute up to `comm_overlap`; CPU offload adds PCIe traffic and a CPU optimizer step. Every efficiency is a
field of PlanConstants so `shardtune.plan.calibrate` can fit it to measurements. docs/planner.md derives the terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardtune.model.shapes import ModelShape
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.activations import (activation_bytes_per_token_layer, offload_moved_bytes_per_token,
                                        recomputed_layers)
from shardtune.plan.weights import base_param_elem, lora_params, trainable_params, weight_bytes
from shardtune.plan.setup import TrainSetup


# ------------------------------------------------------------------------------------------------ FLOPs

@dataclass(frozen=True)
class Flops:
    """FLOPs per token, split by where they run (one micro batch = setup.tokens tokens)."""

    forward: float          # block linears + output projection + LoRA + attention, one forward
    backward: float         # input gradients (+ weight gradients for full), LoRA gradients, attention backward
    recompute: float        # the second forward of the decoder layers under gradient checkpointing
    attention: float        # the attention part of the three above (runs at attn_eff, not matmul_eff)
    lora: float             # the LoRA part (skinny matmuls, counted as memory traffic for time)

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def flops_per_token(shape: ModelShape, setup: TrainSetup) -> Flops:
    """Matmul FLOPs per token.

    Forward: 2 per weight of every block linear and of the output projection (N), 2 per LoRA weight, and causal
    attention 2*s*q_dim per layer (QK^T and AV are 2*s*q_dim each, half of the positions are masked).
    Backward: the input gradient of every matmul again (2N) -- a frozen base needs no weight gradient, full
    fine-tuning adds it (2N more) -- LoRA's input and weight gradients (4 per LoRA weight), and attention's
    backward (2x its forward). Checkpointing recomputes the decoder layers' forward (not the output projection).
    """
    L, s = shape.layers, setup.seq_len
    n_blocks = shape.params_linear
    n_head = shape.vocab * shape.hidden
    n_lora = lora_params(shape, setup)
    attn_fwd = 2 * L * s * shape.q_dim
    fwd = 2 * (n_blocks + n_head) + 2 * n_lora + attn_fwd
    bwd = 2 * (n_blocks + n_head) + 4 * n_lora + 2 * attn_fwd
    if setup.method == "full":
        bwd += 2 * (n_blocks + n_head)
    f = recompute_fraction(shape, setup)
    if setup.ckpt_policy == "selective":
        # selective checkpointing keeps every base matmul's and attention's output: only LoRA's B matmul (about
        # half of the LoRA FLOPs) runs again; its element-wise ops and dequantization are counted in predict_speed
        rec, attention, lora = n_lora * f, attn_fwd * 3, 6 * n_lora + n_lora * f
    else:
        rec = (2 * n_blocks + 2 * n_lora + attn_fwd) * f
        attention = attn_fwd * (3 + f)
        lora = 6 * n_lora + 2 * n_lora * f
    if setup.fused_loss == "chunked":
        rec += 2 * n_head                   # the loss chunks are checkpointed
    return Flops(fwd, bwd, rec, attention, lora)


def activation_bytes_moved(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Saved-activation bytes of one micro batch that activation offloading moves each way: every non-recomputed
    layer's saved tensors and every recomputed layer's input."""
    return offload_moved_bytes_per_token(shape, setup, c) * setup.tokens


def fused_lora_extra_bytes(shape: ModelShape, setup: TrainSetup) -> float:
    """Extra memory traffic per token of fused LoRA over peft's dropout (model/lora_fused.py, counted by op, in
    compute-dtype elements of every LoRA input): forward draws the mask (write 1), scales it (read 1, write 1) and
    applies it (read 2, write 1) = 6; backward draws and scales it again (3), masks the input gradient (read 2, write
    1) and rebuilds the dropped input for lora_A's gradient (read 2, write 1) = 9; peft's fused dropout kernel costs
    2.5 forward (read, write, 1-byte mask) and 2.5 backward. A recomputed layer draws its forward masks again."""
    per_elem = (6 + 9 - 5) + 6 * recompute_fraction(shape, setup)
    targeted = shape.targeted_linears(setup.lora_targets)
    return per_elem * setup.elem * sum(lin.in_features for lin in targeted) * shape.layers


def recompute_fraction(shape: ModelShape, setup: TrainSetup) -> float:
    """The share of decoder layers whose forward runs twice (train.checkpoint_layers of them; all with plain
    gradient checkpointing). With checkpoint_policy=selective only their cheap ops run twice: element-wise passes,
    dequantization, host issue and LoRA's B matmul scale with it, the base matmuls and attention do not."""
    return recomputed_layers(shape, setup) / max(shape.layers, 1)


def model_flops_per_token(shape: ModelShape, setup: TrainSetup) -> float:
    """The MFU convention of docs/benchmarks.md: 4N (6N with recomputation, 6N/8N for full) + attention."""
    n = shape.params_linear + shape.vocab * shape.hidden
    f = 0.0 if setup.ckpt_policy == "selective" else recompute_fraction(shape, setup)  # no matmul runs twice
    mult = (6 if setup.method == "full" else 4) + 2 * f
    attn_fwd = 2 * shape.layers * setup.seq_len * shape.hidden
    return mult * n + attn_fwd * (3 + f)


# ------------------------------------------------------------------------------------------------ time

@dataclass
class SpeedEstimate:
    step_s: float
    micro_s: float
    tokens_per_s: float                  # all GPUs together
    mfu: float                           # model FLOPs (docs/benchmarks.md convention) / (GPUs x MFU ceiling)
    parts_s: dict[str, float]            # per optimizer step, by cause (sums to step_s)
    bound: str                           # what limits a micro batch: compute | memory | host
    flops_per_token: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step_s": self.step_s, "micro_s": self.micro_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
                "parts_s": dict(self.parts_s), "bound": self.bound, "flops_per_token": self.flops_per_token,
                "notes": list(self.notes)}


def _allgather_s(nbytes: float, setup: TrainSetup, hw, c: PlanConstants) -> float:
    """Ring all-gather / reduce-scatter of `nbytes` (the unsharded size) over the GPUs of `setup`: each GPU moves
    (N-1)/N of it; across nodes the NIC carries (k-1)/k of it once per node (hierarchical)."""
    n = setup.world_size
    if n <= 1:
        return 0.0
    g = max(1, min(setup.gpus_per_node, n))
    k = max(1, n // g)
    intra = (g - 1) / g * nbytes / (hw.gpu.link_gbs * 1e9 * c.comm_eff) if g > 1 else 0.0
    inter = (k - 1) / k * nbytes / (hw.inter_node_gbs * 1e9 * c.comm_eff) if k > 1 else 0.0
    return max(intra, inter)


def host_seconds_per_micro(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Time the host needs to issue one micro batch's kernels (Python + dispatcher + launch)."""
    n_lin = len(shape.linears)
    n_lora = 0 if setup.method == "full" else len(shape.targeted_linears(setup.lora_targets))
    per_linear = c.host_linear_s + (c.host_quant_linear_s if setup.method in ("qlora", "int8") else 0.0)
    per_layer = (c.host_layer_liger_s if setup.kernels == "liger" else c.host_layer_s)
    per_pass = n_lin * per_linear + n_lora * c.host_lora_s + per_layer
    if setup.strategy == "fsdp":
        per_pass += c.host_fsdp_layer_s
    elif setup.strategy == "deepspeed" and setup.zero_stage == 3:
        # hooks on every submodule: the layer, attention, MLP, norms, each linear and each LoRA's A/B/dropout; with
        # parallel.zero3_leaf_layers the decoder layer is a leaf: one hook gathers all of it
        if setup.zero3_leaf:
            per_pass += c.host_zero3_module_s + c.host_zero3_leaf_param_s * (n_lin + 2 * n_lora + 2)
        else:
            per_pass += c.host_zero3_module_s * (6 + n_lin + 4 * n_lora)
    passes = 1 + c.host_backward_factor + recompute_fraction(shape, setup) * (1 + c.host_ckpt_extra)
    return shape.layers * per_pass * passes + c.host_micro_s


def predict_speed(shape: ModelShape, setup: TrainSetup, hw, c: PlanConstants = DEFAULT_CONSTANTS) -> SpeedEstimate:
    gpu = hw.gpu
    N, T, e = setup.world_size, setup.tokens, setup.elem
    peak = gpu.peak_tflops * 1e12
    bw = gpu.mem_bandwidth_gbs * 1e9 * c.mem_eff
    fl = flops_per_token(shape, setup)
    notes: list[str] = []
    if setup.precision == "fp32":
        peak = peak / 8          # no tensor-core path worth the name for fp32 training; rough
        notes.append("fp32 compute: the planner assumes ~1/8 of the bf16 peak")

    # ---- one micro batch on one GPU
    gemm_flops = (fl.total - fl.attention - fl.lora) * T
    t_gemm = gemm_flops / (peak * c.matmul_eff)
    if setup.method == "int8":
        t_gemm *= c.int8_matmul_slowdown
    t_attn = fl.attention * T / (peak * c.attn_eff)
    if setup.packed:
        t_attn *= c.packed_attn_slowdown
    f = recompute_fraction(shape, setup)
    passes = 2 + f
    t_dequant = 0.0
    if setup.method in ("qlora", "int8"):
        t_dequant = passes * shape.params_linear * c.dequant_bytes_per_param / bw
    act = activation_bytes_per_token_layer(shape, setup, c) * T * shape.layers
    elem_traffic = c.elementwise_traffic_liger if setup.kernels == "liger" else c.elementwise_traffic
    t_elem = elem_traffic * act * (1 + f) / bw
    t_lora = c.lora_traffic * fl.lora / (2 * max(setup.lora_rank, 1)) * e * T / bw if fl.lora else 0.0
    if setup.fused_lora and setup.lora_dropout > 0:
        t_lora += fused_lora_extra_bytes(shape, setup) * T / bw
    if setup.fused_loss == "liger":
        t_loss = c.flce_traffic_bytes_per_logit * T * shape.vocab / bw
    else:
        t_loss = c.loss_traffic_bytes_per_logit * T * shape.vocab / bw
    gpu_s = t_gemm + t_attn + t_dequant + t_elem + t_lora + t_loss
    host_s = host_seconds_per_micro(shape, setup, c)
    micro_compute = max(gpu_s, host_s) + c.host_gpu_serial * min(gpu_s, host_s)
    bound = "host" if host_s > gpu_s else ("compute" if t_gemm + t_attn > gpu_s / 2 else "memory")

    # ---- communication per micro batch and per step
    w = weight_bytes(shape, setup)
    P = trainable_params(shape, setup)
    comm_micro = comm_step = 0.0
    gather_bytes = w.total * (e / 4 if (setup.method == "full" and setup.strategy == "fsdp") else 1)
    if setup.strategy == "fsdp" or (setup.strategy == "deepspeed" and setup.zero_stage == 3):
        gathers = 1 if setup.gathers_all_params else 2        # forward, and again in backward unless kept
        comm_micro += gathers * _allgather_s(gather_bytes, setup, hw, c)
        grad_bytes = 4 * P
        if setup.strategy == "deepspeed" or setup.grad_accum == 1:
            comm_micro += _allgather_s(grad_bytes, setup, hw, c)        # reduce-scatter every micro step
        else:
            comm_step += _allgather_s(grad_bytes, setup, hw, c)         # FSDP: only at the last micro step
    elif setup.strategy == "deepspeed":                                 # ZeRO-2: reduce grads, gather new params
        comm_step += _allgather_s(4 * P, setup, hw, c) + _allgather_s(e * P, setup, hw, c)
    elif setup.strategy == "ddp":
        comm_step += 2 * _allgather_s(4 * P, setup, hw, c)              # all-reduce = reduce-scatter + all-gather
    exposed_micro = max(0.0, comm_micro - c.comm_overlap * micro_compute)

    # ---- offload traffic over PCIe and the optimizer
    pcie = gpu.pcie_gbs * 1e9 * c.pcie_eff
    t_offload_micro = t_offload_step = 0.0
    offload_params = setup.offload_param or (setup.strategy == "fsdp" and setup.offload_optimizer)
    offload_states = setup.offload_optimizer or (setup.strategy == "fsdp" and setup.offload_param)
    if offload_params:
        h2d = (2 if not setup.gathers_all_params else 1) * w.total / max(N, 1)
        t_offload_micro = max(0.0, h2d / pcie - c.comm_overlap * micro_compute)
    p_local = P / (N if setup.shards_states else 1)
    if offload_states:
        t_offload_step = (4 * p_local + base_param_elem(setup) * p_local) / pcie
        t_opt = p_local / c.cpu_adam_params_per_s
    else:
        t_opt = p_local * c.optimizer_bytes_per_param / bw + c.optimizer_fixed_s
    t_opt += c.step_fixed_s

    if setup.offload_activations:
        # every saved byte crosses PCIe once in the forward (device to host) and once in backward; each direction
        # overlaps its own pass (forward ~1/3 of the micro batch's compute, backward ~2/3)
        moved = activation_bytes_moved(shape, setup, c)
        t_offload_micro += (max(0.0, moved / pcie - micro_compute / 3) + max(0.0, moved / pcie - 2 * micro_compute / 3))
    micro_s = micro_compute + exposed_micro + t_offload_micro
    accum = setup.grad_accum
    parts = {
        "matmuls": accum * t_gemm, "attention": accum * t_attn, "4-bit/8-bit dequantize": accum * t_dequant,
        "element-wise": accum * (t_elem + t_lora), "logits / loss": accum * t_loss,
    }
    gpu_total = sum(parts.values())
    overhead = accum * micro_compute - gpu_total          # host time not hidden behind the GPU
    parts["host overhead (kernel issue)"] = max(0.0, overhead)
    if overhead < 0:   # GPU-bound: scale the GPU parts to the micro time (the serial fraction is already inside)
        f = accum * micro_compute / gpu_total
        parts = {k: v * f if k != "host overhead (kernel issue)" else v for k, v in parts.items()}
    parts["communication (exposed)"] = accum * exposed_micro + comm_step
    parts["offload (PCIe)"] = accum * t_offload_micro + t_offload_step
    parts["optimizer step"] = t_opt
    step_s = sum(parts.values())
    tokens_per_s = setup.global_batch * setup.seq_len / step_s
    mfu = tokens_per_s / N * model_flops_per_token(shape, setup) / (gpu.mfu_peak_tflops * 1e12)
    if gpu.name.startswith("generic"):
        notes.append("GPU given by memory only: speed uses a generic mid-range card")
    return SpeedEstimate(step_s=step_s, micro_s=micro_s, tokens_per_s=tokens_per_s, mfu=mfu,
                         parts_s=parts, bound=bound, flops_per_token=fl.total, notes=notes)
