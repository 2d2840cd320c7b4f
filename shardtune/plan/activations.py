"""Activation and loss bytes per token from the model shape: what autograd keeps per decoder layer (with and without
checkpointing), what is kept once for all layers, the loss spike, and the transients inside one layer's backward.
docs/planner.md walks through the layer op by op. Pure Python (no torch).
"""

from __future__ import annotations

from shardtune.model.shapes import ModelShape
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.setup import TrainSetup
from shardtune.plan.weights import fp32_autocast, fp32_residual, kbit_upcast

FUSED_CHUNK_TOKENS = 2048  # shardtune.train.loss.fused_loss_sum chunk without Liger


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
    if setup.packed:
        # packed rows come with a mask: transformers repeats K and V to every query head before SDPA (no GQA with
        # a mask), so the repeated copies are what is saved, and SDPA turns the bool mask into an additive one in
        # the compute dtype, saved by each layer (one row of seq_len per token)
        out["attention q,k,v,out"] += e * 2 * (qd - kvd)
        out["packing mask (additive, per layer)"] = e * setup.seq_len
    # gated MLP: act(gate) keeps gate's output; gate*up keeps act's output and up's output. Liger's SwiGLU keeps
    # only gate's and up's outputs (recomputes the activation in backward). In fp32 when bitsandbytes' 4-bit layers
    # read the HF stack's fp32 residual stream (they return their input's dtype).
    out["mlp intermediates"] = ((2 if liger else 3) if shape.gated_mlp else 1) * mlp_elem(setup) * I
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
    # The HF stack's fp32 norm weights make every norm output fp32, so autocast casts it for each LoRA path alike.
    own_copy = setup.autocast and (setup.method == "lora" or kbit_upcast(setup))
    if setup.fused_lora:
        # shardtune's fused LoRA keeps x (in the compute dtype) and regenerates the mask: paths reading one tensor
        # share it, o_proj's input is SDPA's saved output; the down projection's input is kept for its LoRA alone
        groups = {lin.input_group: lin.in_features for lin in targeted}
        out["lora inputs (shared, mask regenerated)"] = sum(e * n for g, n in groups.items() if g != "attn_out")
    elif setup.lora_dropout > 0:
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
    if recomputed_layers(shape, setup) or setup.method == "full":
        return 0.0
    e = setup.elem
    mask = e if c.dropout_mask_bytes is None else c.dropout_mask_bytes
    masks = 0.0
    if setup.lora_dropout > 0 and not setup.fused_lora:
        masks = sum(mask * lin.in_features for lin in shape.targeted_linears(setup.lora_targets)
                    if lin.input_group == "attn_in")
    return norm_saved_per_token(shape, setup) + masks


def mlp_elem(setup: TrainSetup) -> int:
    """Bytes per element of the MLP's gate/up outputs and activation. bitsandbytes' Linear4bit computes in its
    compute dtype and casts its output back to its input's dtype (`matmul_4bit(...).to(inp_dtype)`), so with the HF
    stack's fp32 residual stream (kbit upcast, fp32 norms) gate and up return fp32 and the SiLU and the product
    keep fp32 tensors: 6 B x intermediate per token and layer more than in the compute dtype (on one H200, the
    HF peer without checkpointing allocated 60.65 GB; the planner said 49.30 without this term, 60.57 with it)."""
    if setup.method == "qlora" and fp32_residual(setup) and not fp32_autocast(setup):
        return 4
    return setup.elem


def residual_elem(setup: TrainSetup) -> int:
    """Bytes per element of the residual stream: fp32 when fp32 master weights meet autocast (full), else compute."""
    return 4 if fp32_residual(setup) else setup.elem


def recomputed_layers(shape: ModelShape, setup: TrainSetup) -> int:
    """Decoder layers recomputed in backward: none without checkpointing, else train.checkpoint_layers (0: all)."""
    if not setup.grad_ckpt:
        return 0
    return min(shape.layers, setup.ckpt_layers) if setup.ckpt_layers else shape.layers


def saved_bytes_per_token(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Bytes all decoder layers keep per token at the end of the forward when some recompute: each recomputed
    layer keeps only its input (or, with train.checkpoint_policy=selective, its input and its matmul and
    attention outputs), the others everything."""
    k = recomputed_layers(shape, setup)
    return (recomputed_layer_bytes_per_token(shape, setup) * k
            + activation_bytes_per_token_layer(shape, setup, c) * (shape.layers - k))


def checkpoint_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup) -> int:
    """With per-layer checkpointing only each layer's input hidden state is kept."""
    return residual_elem(setup) * shape.hidden


def recomputed_layer_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> float:
    """What one recomputed layer keeps per token under the setup's checkpoint policy."""
    if setup.ckpt_policy == "selective":
        return selective_bytes_per_token_layer(shape, setup)
    return checkpoint_bytes_per_token_layer(shape, setup)


def offload_stays_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> float:
    """Saved bytes per token that activation offloading cannot move: selective checkpointing keeps its matmul and
    attention outputs in the checkpoint's own cache, out of reach of the saved-tensor hooks; only each recomputed
    layer's input moves (measured on the CPU: tests/train/test_offload_activations.py)."""
    if setup.ckpt_policy != "selective":
        return 0.0
    extra = selective_bytes_per_token_layer(shape, setup) - checkpoint_bytes_per_token_layer(shape, setup)
    return extra * recomputed_layers(shape, setup)


def offload_moved_bytes_per_token(shape: ModelShape, setup: TrainSetup, c: PlanConstants = DEFAULT_CONSTANTS) -> float:
    """Saved bytes per token that activation offloading moves each way: everything the hooks can reach, or with
    train.offload_layers=n the whole saved set of the first n layers that do not recompute."""
    if setup.offload_layers is not None:
        n = min(max(0, setup.offload_layers), shape.layers - recomputed_layers(shape, setup))
        return n * activation_bytes_per_token_layer(shape, setup, c)
    return saved_bytes_per_token(shape, setup, c) - offload_stays_bytes_per_token(shape, setup)


def selective_bytes_per_token_layer(shape: ModelShape, setup: TrainSetup) -> float:
    """With selective checkpointing (model/selective_checkpoint.py) a recomputed layer keeps its input, the output
    of every base projection (q, k, v, o, gate, up, down: matmuls with K = hidden or intermediate), the attention
    kernel's output and fp32 log-sum-exp per head, and each LoRA A output (rank r wide); LoRA's B matmul (K = r),
    norms, activations, RoPE, dropout and dequantization are recomputed. LoRA ranks above the policy's SMALL_K_MAX
    keep B's output too. Measured on CPU against the planner: tests/model/test_selective_checkpointing.py."""
    from shardtune.model.selective_checkpoint import SMALL_K_MAX
    e = setup.elem
    out = checkpoint_bytes_per_token_layer(shape, setup)
    out += e * sum(lin.out_features for lin in shape.linears)
    out += e * shape.q_dim + 4 * shape.heads
    if setup.method != "full":
        targeted = shape.targeted_linears(setup.lora_targets)
        out += e * setup.lora_rank * len(targeted)
        if setup.lora_rank > SMALL_K_MAX:
            out += e * sum(lin.out_features for lin in targeted)
    return out


def shared_activation_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """Kept once for all layers: RoPE cos/sin, the final norm's fp32 input, input ids / labels / mask (int64)."""
    rope = 2 * setup.elem * shape.head_dim
    final_norm = norm_saved_per_token(shape, setup)
    batch = 3 * 8
    head_input = setup.elem * shape.hidden if setup.method == "full" or lm_head_trained(setup) else 0
    return rope + final_norm + batch + head_input


def lm_head_trained(setup: TrainSetup) -> bool:
    """modules_to_save trains the output projection (peft's trainable copy of lm_head / embed_out)."""
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
    per_token = (c.bwd_transient_mlp * mlp_elem(setup) * shape.intermediate
                 + c.bwd_transient_hidden * residual_elem(setup) * shape.hidden)
    if setup.method == "lora" and setup.autocast:
        # peft's fp32 cast of the LoRA input turns its gradient fp32 too (one more through dropout's backward)
        widest = max((lin.in_features for lin in shape.targeted_linears(setup.lora_targets)), default=0)
        per_token += (2 if setup.lora_dropout > 0 else 1) * 4 * widest
    biggest = max(lin.weight_numel for lin in shape.linears)
    dequant = biggest * setup.elem if setup.method in ("qlora", "int8") else 0
    return per_token * setup.tokens + dequant
