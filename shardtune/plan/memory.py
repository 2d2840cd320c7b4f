"""Bytes per GPU and per node of CPU RAM, by component, for one training setup, from the model shape alone.

The model is written for how shardtune runs (docs/planner.md derives every term): a transformers decoder with SDPA
attention; frozen base weights in the compute dtype, or bitsandbytes NF4/FP4 (storage dtype = compute dtype) or
LLM.int8; peft LoRA in fp32 under autocast; AdamW fp32 states on the trainable parameters; HF per-layer gradient
checkpointing; cross-entropy over logits upcast to fp32. Pure Python (no torch), so `shardtune plan` is instant.
Per-component sizes live in plan/weights.py and plan/activations.py; this module places them on the GPU and the CPU
phase by phase and picks the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardtune.hardware import GiB
from shardtune.model.shapes import ModelShape
from shardtune.plan.activations import (FUSED_CHUNK_TOKENS, activation_bytes_per_token_layer,  # noqa: F401
                                        backward_transient_bytes, checkpoint_bytes_per_token_layer,
                                        first_layer_discount_per_token, lm_head_trained, loss_forward_bytes,
                                        loss_peak_bytes, offload_moved_bytes_per_token,
                                        recomputed_layers, saved_bytes_per_token,
                                        shared_activation_bytes_per_token)
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.cpu_ram import (cpu_notes, load_peak_bytes, offloaded_cpu_bytes, offloads,  # noqa: F401
                                     offloads_params, offloads_states)
from shardtune.plan.setup import TrainSetup, fsdp_layers_per_unit
from shardtune.plan.weights import (WeightBytes, base_param_elem, fp32_autocast, kbit_upcast, lora_elem,  # noqa: F401
                                    lora_params, optimizer_bytes_per_param, quantized_linear_bytes, trainable_params,
                                    weight_bytes)

# (names re-exported above: the planner's per-component functions stay importable from plan.memory)

GRADS = "gradients (fp32)"
PHASES = ("loss backward", "layer backward", "optimizer step", "end of forward")


# ------------------------------------------------------------------------------------------------ base weights

def resident_share(setup: TrainSetup) -> float:
    """Fraction of the model's parameters resident on each GPU: 1/N when sharded (FSDP2, ZeRO-3), none when those
    shards are offloaded, all of them otherwise."""
    if not setup.shards_params:
        return 1.0
    return 0.0 if offloads_params(setup) else 1.0 / setup.world_size


def load_share(setup: TrainSetup) -> float:
    """Fraction of the model's weights on each GPU while loading. FSDP2 streams each rank's shard (to the CPU under
    offload); shardtune's DeepSpeed engine loads a whole replica on every GPU and partitions it in
    `deepspeed.initialize` (measured: the 8B 4-bit model whole on each of 2 ranks at load,
    bench/results/d8b_ds3_mb2_ckpt1_2gpu_final.json), so under ZeRO-3 the load, not the step, can be the peak."""
    if setup.strategy == "deepspeed" and setup.stack == "shardtune":
        # parallel.zero3_load=cpu: the replica is in CPU RAM; the GPU holds one parameter while partitioning
        return 0.0 if setup.zero3_cpu_load else 1.0
    return resident_share(setup)


def consts_sharded(setup: TrainSetup, c: PlanConstants) -> bool:
    """FSDP2 and ZeRO-3 shard the 4-bit quantization constants too (ShardedLinear4bit makes them parameters)."""
    return setup.shards_params and c.quant_state_sharded


def gathered_param_bytes(shape: ModelShape, setup: TrainSetup, w: WeightBytes, c: PlanConstants) -> float:
    """Parameters gathered unsharded while computing (FSDP2, ZeRO-3): the unit in use, the prefetched one and the
    output projection; with reshard_after_forward=False every unit from its forward to its backward. FSDP gathers in
    the compute dtype (mixed-precision policy), so full fine-tuning's fp32 shards gather at half the bytes."""
    if not setup.shards_params:
        return 0.0
    L = shape.layers
    gather_scale = setup.elem / 4 if (setup.method == "full" and setup.strategy == "fsdp") else 1.0
    layer_gather = (w.per_layer if consts_sharded(setup, c) else w.per_layer - w.quant_consts / L) * gather_scale
    if setup.gathers_all_params:
        return L * layer_gather + w.root * gather_scale
    head = (shape.vocab * shape.hidden + shape.final_norm_params) * base_param_elem(setup) * gather_scale
    if setup.stack == "hf" and setup.strategy == "fsdp" and not shape.tied_embeddings:
        # the HF stack's wrapping (Answer.AI's train.py, accelerate's transformer auto-wrap) leaves the embeddings in
        # the root unit with the head, and FSDP keeps the root gathered from its forward to the end of backward
        # (FSDP1 `_post_forward_reshard` skips the root; FSDP2's root does not reshard after forward)
        head += shape.vocab * shape.hidden * base_param_elem(setup) * gather_scale
    unit = fsdp_layers_per_unit(setup.fsdp_layers_per_unit, layer_gather, L) if setup.strategy == "fsdp" else 1
    return min(c.fsdp_prefetch_layers * unit, L) * layer_gather + head


def resident_weight_bytes(setup: TrainSetup, w: WeightBytes, c: PlanConstants) -> dict[str, float]:
    """The base weights each GPU holds at rest, labelled the way the method stores them."""
    share = resident_share(setup)
    consts = w.quant_consts * (share if consts_sharded(setup, c) else 1.0)
    data = w.quant_data * share
    dense = w.non_quantized * share
    if setup.method == "qlora":
        return {"weights: 4-bit data": data, "weights: quant constants": consts, "weights: non-quantized": dense}
    if setup.method == "int8":
        return {"weights: int8 data + scales": data + consts, "weights: non-quantized": dense}
    if setup.method == "full":
        return {"weights (trainable)": dense}
    return {"weights: base (frozen)": dense}


# ------------------------------------------------------------------------------------------------ trainable state

@dataclass(frozen=True)
class TrainableBytes:
    """Per-GPU bytes of the trainable parameters' state, before any offload."""

    params: int              # trainable parameter count
    lora_label: str | None   # how the LoRA weights are held (None for full fine-tuning: they are the base weights)
    lora_weights: float
    grads: float             # fp32 gradients (1/N when the engine partitions them)
    states: float            # optimizer states
    master: float            # ZeRO's fp32 master partition
    bucket: float            # communication buffers for the gradient reduction


def trainable_bytes(shape: ModelShape, setup: TrainSetup, c: PlanConstants) -> TrainableBytes:
    N = setup.world_size
    P = trainable_params(shape, setup)
    div = N if setup.shards_states else 1
    label, lora = None, 0.0
    if setup.method != "full":
        if setup.strategy == "deepspeed":     # DeepSpeed casts the module (LoRA included) to the compute dtype
            label, lora = "LoRA weights", setup.elem * P * (1 / N if setup.zero_stage == 3 else 1)
        else:
            le = lora_elem(setup)
            label, lora = f"LoRA weights ({'fp32' if le == 4 else setup.precision})", le * P * resident_share(setup)
    # gradients and torch AdamW's states follow the trainable parameters' dtype (fp32 but for bf16 LoRA on the HF
    # stack); DeepSpeed keeps fp32 gradient partitions whatever the module's dtype
    pe = lora_elem(setup) if setup.method != "full" and setup.strategy != "deepspeed" else 4
    return TrainableBytes(params=P, lora_label=label, lora_weights=lora, grads=pe * P / div,
                          states=optimizer_bytes_per_param(setup.optimizer, pe) * P / div,
                          master=4 * P / N if setup.strategy == "deepspeed" else 0.0,
                          bucket=grad_bucket_bytes(shape, setup, P, c))


def grad_bucket_bytes(shape: ModelShape, setup: TrainSetup, trainable: int, c: PlanConstants) -> float:
    """ZeRO's reduce bucket (compute dtype); DDP's reducer buckets (a copy of every gradient); FSDP2's unsharded fp32
    gradients of one unit before and while reduce-scattering."""
    if setup.strategy == "deepspeed":
        return setup.elem * min(c.ds_reduce_bucket_elems or shape.hidden ** 2, trainable)
    if setup.strategy == "ddp":
        return 4 * trainable
    if setup.strategy == "fsdp":
        layer_trainable = trainable / shape.layers if setup.method != "full" else shape.params_per_layer
        return 2 * 4 * layer_trainable
    return 0.0


def static_gpu_bytes(setup: TrainSetup, w: WeightBytes, t: TrainableBytes, c: PlanConstants) -> dict[str, float]:
    """Everything resident for the whole step, in display order: weights, LoRA weights, ZeRO's master partition and
    runtime, optimizer states (0 when offloaded), gradient buckets."""
    gpu = resident_weight_bytes(setup, w, c)
    if t.lora_label:
        gpu[t.lora_label] = t.lora_weights
    on_gpu = not offloads_states(setup)
    if t.master and on_gpu:
        gpu["fp32 master (ZeRO)"] = t.master
    if setup.strategy == "deepspeed" and setup.zero_stage == 3:
        gpu["ZeRO-3 runtime (measured, not derived)"] = c.ds_zero3_extra_bytes
    gpu["optimizer states"] = t.states if on_gpu else 0.0
    if t.bucket:
        gpu["comm: grad buckets"] = t.bucket
    return gpu


# ------------------------------------------------------------------------------------------------ activations

ACT_OFFLOAD_WINDOW = 2 ** 30  # shardtune/train/offload.py: max_inflight_bytes and prefetch_bytes


@dataclass(frozen=True)
class StepBytes:
    """Per-GPU bytes that come and go within a step, the terms the phases combine."""

    act_layer: float         # saved activations per token of one layer (no checkpointing)
    saved_fwd: float         # saved activations at the end of the forward
    saved_bwd: float         # ... during the last layer's backward (recomputed with checkpointing)
    shared: float            # kept once for all layers
    loss: float              # the loss spike at the start of backward
    loss_fwd: float          # logits / loss tensors at the end of the forward
    transient: float         # inside one layer's backward
    grads_gpu: float         # all gradients on the GPU (0 when offloaded)
    grads_layer: float       # gradients alive during one layer's backward
    grads_prev: float        # earlier micro steps' gradients (accumulation)
    gathered: float          # unsharded parameters being used (FSDP2, ZeRO-3)
    output_kept: float = 0.0  # fp32 logits of a model output the loop keeps through backward (TrainSetup.keeps_output)


def step_bytes(shape: ModelShape, setup: TrainSetup, t: TrainableBytes, gathered: float, c: PlanConstants) -> StepBytes:
    tokens, L = setup.tokens, shape.layers
    act_layer = activation_bytes_per_token_layer(shape, setup, c)
    if recomputed_layers(shape, setup):
        saved_fwd = saved_bytes_per_token(shape, setup, c) * tokens
        saved_bwd = saved_fwd + act_layer * tokens
    else:
        saved_fwd = saved_bwd = (act_layer * L - first_layer_discount_per_token(shape, setup, c)) * tokens
    if setup.offload_activations:
        # what stays on the GPU: copies in flight in the forward and prefetched ones in backward (offload.py's
        # windows, 1 GiB each), never more than what would have been saved, plus what the hooks cannot reach
        moved = offload_moved_bytes_per_token(shape, setup, c) * tokens
        saved_fwd = max(0.0, saved_fwd - moved) + min(moved, ACT_OFFLOAD_WINDOW)
        saved_bwd = max(0.0, saved_bwd - moved) + min(moved, 2 * ACT_OFFLOAD_WINDOW + act_layer * tokens)
    grads_gpu = 0.0 if offloads_states(setup) else t.grads
    # without a gradient sync between micro steps FSDP2 keeps the unsharded gradients (LoRA: small)
    grads_accum = 4 * t.params if (setup.strategy == "fsdp" and setup.grad_accum > 1) else grads_gpu
    return StepBytes(act_layer=act_layer, saved_fwd=saved_fwd, saved_bwd=saved_bwd,
                     shared=shared_activation_bytes_per_token(shape, setup) * tokens,
                     loss=loss_peak_bytes(shape, setup, c), loss_fwd=loss_forward_bytes(shape, setup, c),
                     transient=backward_transient_bytes(shape, setup, c), grads_gpu=grads_gpu,
                     grads_layer=grads_gpu / L if setup.method == "full" else grads_gpu,
                     grads_prev=grads_accum if setup.grad_accum > 1 else 0.0, gathered=gathered,
                     output_kept=4.0 * tokens * shape.vocab if setup.keeps_output else 0.0)


@dataclass(frozen=True)
class AutocastCopies:
    """Compute-dtype copies autocast caches of fp32 leaf weights for the whole forward (FSDP's mixed-precision policy
    and DeepSpeed hand the forward compute-dtype parameters instead, so only none/DDP have them)."""

    lora: float      # every LoRA weight
    full: float      # every matmul weight (full fine-tuning with fp32 masters)
    head: float      # the output projection: recast for the loss backward even with checkpointing
    layer: float     # one layer's matmul weights: recast while recomputing it
    # a frozen fp32 output projection (the HF stack's kbit upcast): autocast does not cache casts of weights that
    # do not require grad, but the matmul saves its compute-dtype copy of the weight for the gradient of its input,
    # so the copy lives from the head's forward to the head's backward (tests/plan/test_plan_head_cast.py)
    frozen_head: float = 0.0

    def held(self, phase: str, grad_ckpt: bool) -> float:
        """The copies alive at `phase`: with checkpointing only the recomputed layer's (and the head's) exist in
        backward; at the end of the forward, all of them. The frozen head's copy is gone once the head's backward
        has run (before any layer's backward)."""
        frozen = self.frozen_head if phase in ("end of forward", "loss backward") else 0.0
        if phase == "end of forward":
            return (self.full or self.lora) + frozen
        if not grad_ckpt:
            return self.lora + self.full + frozen
        return self.layer + self.head if phase == "layer backward" else self.head + frozen


def autocast_copies(shape: ModelShape, setup: TrainSetup) -> AutocastCopies:
    e = setup.elem
    lora = (e * lora_params(shape, setup) if setup.autocast and setup.method != "full" and lora_elem(setup) == 4
            and setup.strategy in ("none", "ddp") else 0)
    full = e * shape.matmul_params if fp32_autocast(setup) else 0
    frozen_head = (e * shape.vocab * shape.hidden if setup.autocast and fp32_frozen_head(setup)
                   and setup.strategy in ("none", "ddp") else 0)
    return AutocastCopies(lora=lora, full=full, head=e * shape.vocab * shape.hidden if full else 0,
                          layer=e * shape.linear_weight_params_per_layer if full else 0, frozen_head=frozen_head)


def fp32_frozen_head(setup: TrainSetup) -> bool:
    """The HF stack's kbit upcast leaves the LM head fp32 (unless the QLoRA paper's script casts it back with bf16
    LoRA) and, unless modules_to_save trains it, frozen."""
    return kbit_upcast(setup) and setup.lora_dtype == "fp32" and not lm_head_trained(setup)


# ------------------------------------------------------------------------------------------------ phases

def phase_bytes(phase: str, static: float, s: StepBytes, casts: float) -> tuple[float, dict[str, float]]:
    """(allocated bytes, the components above `static` for display) at one candidate peak."""
    if phase == "loss backward":       # start of backward: every saved tensor + the cross-entropy backward spike
        total = static + s.saved_fwd + s.shared + s.loss + s.output_kept + s.grads_prev + s.gathered + casts
        parts = {GRADS: s.grads_prev, "activations": s.saved_fwd + s.shared, "logits / loss": s.loss + s.output_kept,
                 "autocast weight copies": casts}
    elif phase == "layer backward":    # the last layer's activations (recomputed with checkpointing) + transients
        grads = max(s.grads_prev, s.grads_layer)
        total = static + s.saved_bwd + s.shared + s.transient + s.gathered + grads + casts + s.output_kept
        parts = {GRADS: grads, "activations": s.saved_bwd + s.shared, "backward transients": s.transient,
                 "autocast weight copies": casts}
        if s.output_kept:
            parts["logits / loss"] = s.output_kept
    elif phase == "optimizer step":    # all gradients + states (activations freed)
        return static + s.grads_gpu, {GRADS: s.grads_gpu}
    else:                              # end of forward: logits and the fp32 loss tensors
        total = static + s.saved_fwd + s.shared + s.loss_fwd + s.grads_prev + s.gathered + casts
        parts = {GRADS: s.grads_prev, "activations": s.saved_fwd + s.shared, "logits / loss": s.loss_fwd,
                 "autocast weight copies": casts}
    if s.gathered:
        parts["comm: gathered params (fsdp/zero3)"] = s.gathered
    return total, parts


def reserved_bytes(peak_allocated: float, s: StepBytes, setup: TrainSetup, c: PlanConstants) -> tuple[float, float]:
    """torch's reserved memory at the peak: (held, with room). `held`: the allocated bytes plus the split blocks
    the caching allocator cannot give back (free space inside segments that still hold live tensors, growing with
    the per-layer tensors it recycles). `with room`: plus the sharded engines' extra cache (whole segments freed by
    the collectives' streams and by the loss spike), or the HF stack's full-logits loss cache, which the allocator
    keeps only while the device has room:
    when cudaMalloc fails it releases every free cached segment and retries (CUDACachingAllocator's
    release_cached_blocks) before it raises out-of-memory."""
    held = (peak_allocated * (1 + c.alloc_frag_frac) + c.alloc_frag_layer_frac * s.act_layer * setup.tokens
            + c.alloc_frag_min_bytes)
    room = held
    if (setup.strategy in ("fsdp", "deepspeed") or setup.fsdp_no_shard) and setup.world_size > 1:
        room += c.shard_slack_bytes + c.shard_slack_loss_frac * s.loss
    elif setup.stack == "hf" and setup.fused_loss == "none":
        room += c.hf_loss_cache_bytes_per_logit / c.loss_bytes_per_logit * s.loss
    return held, room


def fixed_device_bytes(setup: TrainSetup, c: PlanConstants) -> int:
    """Outside torch's allocator: the CUDA context, and NCCL's buffers when there are several ranks."""
    return c.cuda_context_bytes + (c.nccl_bytes if setup.world_size > 1 else 0)


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
    ranks_per_node: int = 1
    offload: bool = False             # something lives in CPU memory: then the node's CPU RAM must be known
    reserved_held: int = 0            # the part of peak_reserved the allocator cannot give back under pressure

    def fits(self, margin: float) -> bool:
        return self.usage_vs_budget <= (1 - margin) * self.budget and self.cpu_fits()

    def cpu_fits(self) -> bool:
        """Within 90% of the node's CPU RAM; unknown RAM passes only when nothing is offloaded (never assumed)."""
        if self.cpu_budget is None:
            return not self.offload
        return self.cpu_need <= 0.9 * self.cpu_budget

    @property
    def cpu_need(self) -> int:
        """CPU RAM per node at its peak: steady state, or every rank at its load-time peak if that is higher."""
        return max(self.cpu_total, self.load_peak_cpu_per_rank * self.ranks_per_node)

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
                "cpu_per_rank": self.cpu_total / max(1, self.ranks_per_node), "notes": list(self.notes),
                "reserved_held": self.reserved_held}




def predict_memory(shape: ModelShape, setup: TrainSetup, hw, c: PlanConstants = DEFAULT_CONSTANTS) -> MemoryEstimate:
    """Per-GPU peak allocated / reserved memory and CPU RAM of `setup` on hardware `hw`."""
    w = weight_bytes(shape, setup)
    t = trainable_bytes(shape, setup, c)
    s = step_bytes(shape, setup, t, gathered_param_bytes(shape, setup, w, c), c)
    copies = autocast_copies(shape, setup)
    capped = getattr(hw, "memory_cap_bytes", None)
    fixed = fixed_device_bytes(setup, c)
    paged_out = 0.0
    while True:
        gpu = static_gpu_bytes(setup, w, t, c)
        if paged_out:
            gpu["optimizer states"] -= paged_out
        static = sum(gpu.values())
        phases, parts = {}, {}
        for phase in PHASES:
            phases[phase], parts[phase] = phase_bytes(phase, static, s, copies.held(phase, setup.grad_ckpt))
        peak_phase = max(phases, key=phases.get)
        peak_alloc = phases[peak_phase]
        gpu.update(parts[peak_phase])
        held, room = reserved_bytes(peak_alloc, s, setup, c)
        # the releasable cache stops growing at the device (or the cap): reserved is then what is left of it
        limit = hw.gpu_memory_bytes - (0 if capped else fixed)
        reserved = max(held, min(room, limit))
        device_total = reserved + fixed
        over = (held if capped else held + fixed) - hw.gpu_memory_bytes
        if paged_out or over <= 0 or not setup.optimizer.startswith("paged"):
            break
        # bitsandbytes' paged optimizers keep their states in unified memory: under pressure the driver pages them
        # to CPU RAM instead of failing, so the peak is what is left once they are out
        paged_out = min(gpu["optimizer states"], over / (1 + c.alloc_frag_frac))
    gpu["allocator overhead (reserved - allocated)"] = reserved - peak_alloc
    gpu["CUDA context + NCCL"] = fixed
    notes = ["per-process cap: only torch's reserved memory counts against it (context/NCCL lie outside)"] if capped \
        else []
    if room > reserved:
        notes.append(f"the allocator's releasable cache ({(room - held) / GiB:.1f} GiB with room) is given back at "
                     f"the {'cap' if capped else 'device limit'}: reserved stops there "
                     f"({(reserved - held) / GiB:.1f} GiB of it kept)")
    if paged_out:
        notes.append(f"paged optimizer: {paged_out / GiB:.1f} GiB of its states paged to CPU memory at the peak "
                     "(they move back and forth each step: slower)")
    if setup.offload_activations and setup.offload_layers is not None:
        notes.append("train.offload_layers: memory not validated; on one H200 the copies did not finish within the "
                     "forward and reserved memory was 31-32 GB against 19-20 planned (docs/benchmarks.md)")
    elif setup.offload_activations and not setup.grad_ckpt:
        notes.append("activation offloading without checkpointing: reserved memory is under-planned (13.0 GB "
                     "measured against 9.8 planned on one H200: copies back use their own allocator pool)")

    cpu = {"processes (torch, CUDA, libraries)": c.cpu_base_per_rank_bytes * setup.gpus_per_node}
    cpu.update(offloaded_cpu_bytes(shape, setup, w, t))
    if paged_out:
        cpu["optimizer states (paged out)"] = paged_out * setup.gpus_per_node
    if setup.offload_activations:
        # train/offload.py's pinned pool: every moved byte of a micro batch, in buffers rounded up by at most 1/8
        cpu["offloaded activations (pinned)"] = (offload_moved_bytes_per_token(shape, setup, c) * setup.tokens
                                                 * 1.125 * setup.gpus_per_node)
    load_cpu, load_gpu = load_peak_bytes(shape, setup, w, load_share(setup), fixed, c)
    cpu_budget, more_notes = cpu_notes(setup, hw)
    usage = reserved if capped else device_total
    load_usage = load_gpu - fixed if capped else load_gpu
    if load_usage > usage:
        notes.append(f"loading is the peak: {load_gpu / GiB:.1f} GiB per GPU"
                     + (" (DeepSpeed loads the whole model on every GPU before partitioning it; parallel.zero3_load=cpu "
                        "loads through CPU RAM, parallel.strategy=fsdp loads each rank's shard)"
                        if setup.strategy == "deepspeed" else ""))
        usage = load_usage
    return MemoryEstimate(
        gpu={k: int(v) for k, v in gpu.items()}, peak_allocated=int(peak_alloc), peak_reserved=int(reserved),
        device_total=int(device_total), usage_vs_budget=int(usage),
        reserved_held=int(held),
        budget=int(hw.gpu_memory_bytes), peak_phase=peak_phase, phases={k: int(v) for k, v in phases.items()},
        cpu={k: int(v) for k, v in cpu.items()}, cpu_total=int(sum(cpu.values())), cpu_budget=cpu_budget,
        load_peak_cpu_per_rank=int(load_cpu), load_peak_gpu=int(load_gpu), weights=w, trainable_params=t.params,
        activation_per_token_layer=s.act_layer, notes=notes + more_notes,
        ranks_per_node=setup.gpus_per_node,
        offload=offloads(setup) or setup.zero3_cpu_load or setup.offload_activations)
