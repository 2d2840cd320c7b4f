"""CPU RAM per node: what the processes hold, what offload moves to the CPU (steady state), and the load-time peak.

Offloaded tensors are pinned (page-locked) so the host-device copies run asynchronously. torch's pinned-memory
allocator (ATen/core/CachingHostAllocator.h) rounds every allocation up to the next power of two and keeps freed
blocks cached, so FSDP2's CPUOffloadPolicy(pin_memory=True) costs, per parameter shard, the next power of two of its
bytes, not its bytes: +14% for the 4-bit gate/up/down shards of Llama-2-70B on 2 ranks (58.7 MB -> 64 MiB), about
+2x for many of the small constant blobs. Gradient shards come back from the GPU as non-blocking copies, which torch
also pins. AdamW's states are made with zeros_like (not pinned: plain size). DeepSpeed's offloaded optimizer states
get the x1.5 buffer of DeepSpeed's own estimator (`estimate_zero{2,3}_model_states_mem_needs`,
additional_buffer_factor); frozen parameters that ZeRO-3 offloads (QLoRA/LoRA bases) cost their pinned partitions,
measured on one H200 rank (within 6%, tests/plan/test_plan_cpu_ram.py).

While loading, a rank holds the process, one read chunk of the streamed loader and, with parameter offload, the shard it
keeps on the CPU (plain memory: pinned only when the engine wraps the model); without offload the streamed weights
go straight to the GPU.
"""

from __future__ import annotations

import math

from shardtune.hardware import GiB
from shardtune.model.shapes import ModelShape
from shardtune.plan.constants import PlanConstants
from shardtune.plan.setup import TrainSetup
from shardtune.plan.weights import (WeightBytes, base_param_elem, kbit_upcast, lora_elem, optimizer_bytes_per_param,
                                    quantized_linear_bytes)

DEEPSPEED_CPU_BUFFER = 1.5   # DeepSpeed's estimator: additional_buffer_factor on CPU-offloaded model states


def pinned_bytes(n: float) -> int:
    """Bytes torch's caching host allocator takes for an `n`-byte pinned tensor: the next power of two."""
    n = int(math.ceil(n))
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def offloads_params(setup: TrainSetup) -> bool:
    """Parameters live on the CPU between uses: ZeRO-3 parameter offload, or FSDP2's CPUOffloadPolicy (which moves
    parameters, gradients and optimizer states together)."""
    return setup.offload_param or (setup.strategy == "fsdp" and setup.offload_optimizer)


def offloads_states(setup: TrainSetup) -> bool:
    """Gradients and optimizer states live on the CPU (DeepSpeed optimizer offload, or FSDP2's CPUOffloadPolicy)."""
    return setup.offload_optimizer or (setup.strategy == "fsdp" and setup.offload_param)


def offloads(setup: TrainSetup) -> bool:
    return offloads_params(setup) or offloads_states(setup)


def parameter_tensor_bytes(shape: ModelShape, setup: TrainSetup) -> tuple[list[int], list[int]]:
    """(frozen, trainable) bytes of every parameter tensor of the whole model as the engine holds it: each 4-bit
    linear is two parameters under FSDP (packed data, its constants blob), norms one tensor of `hidden` each, LoRA
    A and B one each."""
    e = 4 if (kbit_upcast(setup) and setup.lora_dtype == "fp32") else base_param_elem(setup)
    norm_e = 4 if kbit_upcast(setup) else e
    full = setup.method == "full"
    frozen_layer: list[int] = []
    train_layer: list[int] = []
    for lin in shape.linears:
        if setup.method in ("qlora", "int8"):
            frozen_layer += list(quantized_linear_bytes(lin, setup.method, setup.elem, setup.double_quant))
        else:
            (train_layer if full else frozen_layer).append(lin.weight_numel * e)
        if lin.bias:
            (train_layer if full else frozen_layer).append(lin.out_features * e)
    norms = max(1, shape.norm_params_per_layer // shape.hidden)
    (train_layer if full else frozen_layer).extend([shape.norm_params_per_layer // norms * norm_e] * norms)
    if not full:
        le = lora_elem(setup)
        for lin in shape.targeted_linears(setup.lora_targets):
            train_layer += [le * setup.lora_rank * lin.in_features, le * lin.out_features * setup.lora_rank]
    root = [shape.params_embed * e] + ([shape.params_lm_head * e] if shape.params_lm_head else [])
    root.append(shape.final_norm_params * norm_e)
    frozen = frozen_layer * shape.layers + ([] if full else root)
    trainable = train_layer * shape.layers + (root if full else [])
    return frozen, trainable


def offloaded_cpu_bytes(shape: ModelShape, setup: TrainSetup, w: WeightBytes, t) -> dict[str, float]:
    """Per node: what offload keeps in CPU memory for all of the node's ranks (`t`: memory.TrainableBytes)."""
    cpu: dict[str, float] = {}
    ranks, N = setup.gpus_per_node, setup.world_size
    if setup.strategy == "fsdp" and offloads_params(setup):
        frozen, trainable = parameter_tensor_bytes(shape, setup)
        shard = lambda b: pinned_bytes(math.ceil(b / N))  # noqa: E731  (dim 0 padded to N, then split)
        cpu["weights (offloaded shards, pinned: power-of-two blocks)"] = sum(map(shard, frozen)) * ranks
        cpu["trainable weights + grads (pinned)"] = 2 * sum(map(shard, trainable)) * ranks
        pe = lora_elem(setup) if setup.method != "full" else 4
        cpu["optimizer states (offloaded)"] = (optimizer_bytes_per_param(setup.optimizer, pe) * t.params / N
                                               * ranks)
        return cpu
    if offloads_states(setup):
        cpu["optimizer states (offloaded)"] = t.states * ranks
        cpu["fp32 grads + masters (offloaded)"] = (t.grads + t.master) * ranks
    frozen_pinned = 0.0
    if offloads_params(setup):
        if setup.strategy == "deepspeed" and setup.method != "full":
            # ZeRO-3 keeps each frozen parameter's partition in its own pinned CPU tensor (offload_param
            # pin_memory): torch's host allocator rounds each up to a power of two. The estimator's x1.5 is for
            # model states; measured on one H200 rank (8B QLoRA, bench/results/d8b_ds3_offload_1rank*.json) the
            # frozen weights cost their pinned blocks and no more
            frozen, _ = parameter_tensor_bytes(shape, setup)
            frozen_pinned = sum(pinned_bytes(math.ceil(b / N)) for b in frozen) * ranks
            cpu["weights (offloaded partitions, pinned: power-of-two blocks)"] = frozen_pinned
        else:
            cpu["weights (offloaded shards)"] = (w.total / N) * ranks
    if setup.strategy == "deepspeed" and cpu:
        cpu[f"DeepSpeed buffers (x{DEEPSPEED_CPU_BUFFER} of offloaded model states, its estimator's factor)"] = \
            (DEEPSPEED_CPU_BUFFER - 1) * (sum(cpu.values()) - frozen_pinned)
    return cpu


def load_peak_bytes(shape: ModelShape, setup: TrainSetup, w: WeightBytes, gpu_share: float, fixed: int,
                    c: PlanConstants) -> tuple[float, float]:
    """(CPU bytes per rank, GPU bytes) while loading. CPU: the process, one read chunk and its cast copy (the
    streamed loader reads a few MiB at a time and frees them), and with parameter offload the rank's shard, kept in
    plain memory until the engine pins it. GPU: the rank's weights (`gpu_share` of them) and the largest checkpoint
    tensor in flight: where the load shards or moves tensors away (`gpu_share` < 1) every tensor passes whole
    through the device first, the embedding included; a whole replica keeps each tensor where it lands, so only a
    quantized linear's compute-dtype copy before quantization is extra (measured: tests/plan/test_plan_load_peak.py)."""
    largest_linear = max(lin.weight_numel for lin in shape.linears)
    if gpu_share < 1:
        largest = max(shape.vocab * shape.hidden, largest_linear)
    else:
        largest = largest_linear if setup.method in ("qlora", "int8") else 0
    kept_cpu = w.total / setup.world_size if offloads_params(setup) else 0.0
    if setup.zero3_cpu_load:  # parallel.zero3_load=cpu: every rank reads the whole model into its RAM first
        kept_cpu = w.total
    base = c.cpu_load_base_per_rank_bytes + (c.cpu_load_dist_extra_bytes if setup.world_size > 1 else 0)
    load_cpu = base + 2 * c.load_chunk_bytes + kept_cpu
    load_gpu = w.total * gpu_share + largest * max(setup.elem, base_param_elem(setup)) + fixed
    return load_cpu, load_gpu


def cpu_notes(setup: TrainSetup, hw) -> tuple[int | None, list[str]]:
    """(CPU RAM per node or None when unknown, notes). Unknown RAM is never assumed: an offload plan then needs
    --cpu-ram (the estimate does not fit until it is given; `shardtune plan` refuses it)."""
    cpu_budget = getattr(hw, "cpu_ram_bytes", None)
    notes = []
    if offloads(setup):
        if cpu_budget is None:
            notes.append("CPU RAM per node unknown: offload plans need it (--cpu-ram 512GB; detected for local GPUs)")
        notes.append("offloaded tensors live in pinned CPU memory (page-locked; cannot swap)")
    return (int(cpu_budget) if cpu_budget else None), notes


def cpu_need_line(cpu_total: int, cpu_budget: int | None) -> str:
    if cpu_budget is None:
        return (f"needs {cpu_total / GiB:.0f} GiB of CPU RAM per node for offload, and the node's CPU RAM is unknown: "
                "give --cpu-ram (e.g. --cpu-ram 512GB)")
    return f"needs {cpu_total / GiB:.0f} GiB of CPU RAM per node, {cpu_budget / GiB:.0f} GiB available (90% usable)"
