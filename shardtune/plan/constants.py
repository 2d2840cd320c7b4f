"""Every tunable number of the planner in one dataclass, so a calibration can fit them and a test can pin them.

Memory terms that follow from tensor shapes (weights, LoRA, optimizer states, saved activations) have no constant;
only what the shapes cannot tell is here: allocator behaviour, fixed per-process costs, and the efficiencies that
turn FLOPs and bytes into seconds. Defaults are first guesses from public measurements; `shardtune.plan.calibrate`
reports how far they are from the lead's GPU measurements in bench/results/calibration*.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from shardtune.hardware import GiB, MiB


@dataclass(frozen=True)
class PlanConstants:
    # ---------------------------------------------------------------- memory (bytes, fractions)
    cuda_context_bytes: int = 500 * MiB        # CUDA context + cuBLAS/cuDNN handles: outside torch's allocator
    nccl_bytes: int = 300 * MiB                # NCCL communicator buffers per process when world > 1
    # reserved - allocated: the caching allocator's slack grows with the size of the per-layer tensors it recycles
    alloc_frag_frac: float = 0.0               # ... as a fraction of the allocated peak
    alloc_frag_layer_frac: float = 0.45        # ... as a fraction of one layer's saved activations (micro batch)
    alloc_frag_min_bytes: int = 48 * MiB
    # sharded engines (fsdp, deepspeed; world > 1) reserve more beyond the allocated peak: blocks cached on the
    # all-gather / reduce-scatter side streams (per-stream pools the compute stream cannot reuse), blocks left from
    # the streamed load, and the full-logit loss tensors splitting those segments. Fitted on the 2xH200 dist_bench
    # records (bench/results/d*_2gpu*.json): a fixed part and a fraction of the loss backward spike.
    shard_slack_bytes: int = 1536 * MiB
    shard_slack_loss_frac: float = 0.43
    loss_bytes_per_logit: float = 12.0         # fp32 log-softmax out + its grad + grad-in at the CE backward peak
    # the HF stack's full-logits loss leaves free cached blocks beside the allocated peak, releasable under pressure:
    # the freed bf16 logits' segment (2 B per logit; the fp32 gradients of the loss backward do not fit in it) and
    # the layer forward's fp32 working set in segments of its own (bench/results/hf_peer_segments_3b_h200.json).
    # Fitted on the 3B peer (bench/results/hf_peer_memory_3b_h200.json: 4.1-4.6 B per logit over 2,048 to 16,384
    # tokens, with and without checkpointing); held out on the 8B peer rows (speed*_h200.json, within 2.1%)
    hf_loss_cache_bytes_per_logit: float = 4.0
    flce_hidden_copies: float = 4.0            # Liger fused linear CE: hidden copy + its grad + ~2 of logit chunk
    bwd_transient_mlp: float = 1.0             # net live gradient tensors of width `intermediate` in a layer backward
    bwd_transient_hidden: float = 1.5          # ... and of width `hidden` (residual grad, norm grads)
    dropout_mask_bytes: float | None = 1.0     # CUDA's fused dropout keeps a bool mask; None = compute dtype (CPU)
    quant_state_sharded: bool = True           # fsdp/zero3: 4-bit constants sharded too (ShardedLinear4bit)
    fsdp_prefetch_layers: int = 2              # unsharded decoder layers in flight (current + prefetched)
    ds_reduce_bucket_elems: int | None = None  # ZeRO reduce bucket; None = hidden^2 (the HF 'auto' value)
    ds_prefetch_bucket_elems: int | None = None  # ZeRO-3 prefetch bucket; None = 0.9 * hidden^2 ('auto')
    # ZeRO-3 allocates this much more than the terms above explain, whatever the loss path: the 2xH200 8B records
    # were 0.89 / 0.87 GB over (full logits, checkpointing on / off) and 1.24 GB (fused loss). Fitted in-sample on
    # those three records of one shape; not derived (candidates: parameters kept gathered by the reuse distance,
    # the contiguous-gradient and prefetch buffers).
    ds_zero3_extra_bytes: int = 1000 * MiB
    cpu_base_per_rank_bytes: int = 3 * GiB     # RSS of a rank with torch + CUDA + transformers imported
    # RSS of a rank when loading begins (before the first checkpoint byte), as the loader's report reads it on every
    # GPU record: 1.06-1.09 GB for one process, 1.42-1.47 GB with a process group of two (NCCL initialised);
    # training later adds kernels and libraries (the steady 1.9-2.6 GB, planned at cpu_base_per_rank_bytes)
    cpu_load_base_per_rank_bytes: int = 1_100_000_000
    cpu_load_dist_extra_bytes: int = 400_000_000
    load_chunk_bytes: int = 32 * MiB           # the streamed loader's read chunk (model/materialize.DEFAULT_CHUNK_BYTES)
    # ---------------------------------------------------------------- speed (fractions of peak, seconds)
    # matmul_eff, host_lora_s, host_quant_linear_s, host_backward_factor and host_gpu_serial were fitted
    # (`python -m shardtune.plan.calibrate --fit ...`) to the 14 one-H100 shardtune rows of bench/results
    # (commit 4bf0945: 1B/3B/8B, lora/qlora, checkpointing on/off, micro batch 1-8, seq 512-4096); worst 14%.
    matmul_eff: float = 0.78                   # achieved / peak for the large bf16 GEMMs of a decoder layer
    attn_eff: float = 0.45                     # flash/efficient SDPA, forward + backward
    # packed rows (data.packing): transformers' masked SDPA path (K/V repeated to every query head, a block-diagonal
    # bool mask, no skipping of the masked upper triangle) against the causal flash path, forward + backward of one
    # layer's attention; measured on one H200, 8B attention shape, seq 2048: 2.74x at micro batch 2, 3.08x at 8
    # (bench/results/attn_mask_h200.json)
    packed_attn_slowdown: float = 2.9
    mem_eff: float = 0.70                      # achieved / peak device bandwidth for memory-bound kernels
    elementwise_traffic: float = 4.0           # bytes moved per byte of saved activation (norms, rope, act, adds)
    elementwise_traffic_liger: float = 2.0     # ... with Liger's fused RMSNorm/RoPE/SwiGLU
    lora_traffic: float = 4.0                  # bytes moved per LoRA input/output element (dropout, casts, add)
    loss_traffic_bytes_per_logit: float = 20.0  # lm_head output + fp32 upcast + log-softmax + its backward
    flce_traffic_bytes_per_logit: float = 6.0  # Liger fused linear cross-entropy (logit chunks stay in cache-ish)
    dequant_bytes_per_param: float = 4.5       # 4-bit read (0.5) + bf16 write (2) + re-read by the GEMM (2)
    int8_matmul_slowdown: float = 2.0          # LLM.int8 matmul with outlier decomposition vs a bf16 GEMM
    # host (Python + dispatcher + launch) time to issue one micro batch, per decoder layer and forward-like pass
    host_linear_s: float = 40e-6               # a base linear (module call + GEMM launch)
    host_quant_linear_s: float = 270e-6        # extra for a bitsandbytes 4-bit / 8-bit linear (quant state, dequant)
    host_lora_s: float = 540e-6                # a peft LoRA wrapper (dropout, casts, A, B, scale, add)
    host_layer_s: float = 400e-6               # norms, RoPE, attention, activation, residuals (transformers modules)
    host_layer_liger_s: float = 150e-6         # ... with Liger's fused kernels
    host_backward_factor: float = 0.94         # backward issue cost relative to one forward pass (autograd is C++)
    host_ckpt_extra: float = 0.3               # checkpoint hooks on top of the recomputed forward
    host_fsdp_layer_s: float = 150e-6          # FSDP2 per unit and pass: hooks, all-gather issue, copy-in/out
    host_zero3_module_s: float = 430e-6        # DeepSpeed ZeRO-3 per submodule and pass: fetch/release hooks, waits (fitted, 2 ds3 records)
    # parallel.zero3_leaf_layers: the one hook per layer still fetches and releases each of the layer's parameters
    # (DeepSpeed's per-parameter status and partition bookkeeping); fitted on the one leaf record
    # (d8b_deepspeed_leaf_mb2_ckpt1_1rank.json, one H200 rank), nothing held out yet
    host_zero3_leaf_param_s: float = 79e-6
    host_micro_s: float = 5e-3                 # per micro batch: batch to device, loss, bookkeeping
    host_gpu_serial: float = 0.0               # fraction of the shorter of host/GPU time that does not overlap
    comm_eff: float = 0.75                     # achieved / nominal link bandwidth for NCCL collectives
    comm_overlap: float = 0.8                  # fraction of compute time that can hide communication
    pcie_eff: float = 0.8                      # achieved / nominal host<->device bandwidth (pinned)
    cpu_adam_params_per_s: float = 3.0e8       # torch AdamW on offloaded (CPU) states, per rank
    optimizer_bytes_per_param: float = 32.0    # fused AdamW: read p, g, m, v and write p, m, v (fp32)
    optimizer_fixed_s: float = 3e-3            # grad clipping, the optimizer's launches, zero_grad
    step_fixed_s: float = 5e-3                 # per optimizer step: LR schedule, loss bookkeeping

    def replace(self, **kw) -> "PlanConstants":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PlanConstants":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            from shardtune.errors import ConfigError
            raise ConfigError(f"unknown planner constant(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "PlanConstants":
        return cls.from_dict(json.loads(Path(path).read_text()))


DEFAULT_CONSTANTS = PlanConstants()
