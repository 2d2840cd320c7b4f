"""train.checkpoint_policy=selective: checkpointed layers keep their matmul and attention outputs and recompute the
cheap ops; gradients equal those without checkpointing (dropout included), and what a layer keeps lies between
layer checkpointing and none, matching the planner's per-layer count."""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from shardtune.model import selective_checkpoint as sc
from shardtune.model.load import checkpointed_blocks, enable_checkpointing

RANK = 8
BATCH, SEQ = 2, 16


def _lora_model(tiny_model, dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32)
    torch.manual_seed(0)
    m = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # peft initialises B to zero: make the LoRA path (and its dropout) reach the loss
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.train()
    return m


class _KeptByLayer(TorchDispatchMode):
    """Records every op output's storage with the decoder layer that made it; `kept()` = bytes per layer still
    alive (parameters excluded), i.e. what autograd or the selective-checkpoint cache holds for backward."""

    def __init__(self, model):
        super().__init__()
        self.layer = -1
        self.refs: dict[int, tuple[int, StorageWeakRef, int]] = {}
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.hooks = []
        for i, block in enumerate(checkpointed_blocks(model.get_base_model())):
            self.hooks.append(block.register_forward_pre_hook(lambda mod, a, i=i: setattr(self, "layer", i)))
            self.hooks.append(block.register_forward_hook(lambda mod, a, o: setattr(self, "layer", -1)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):  # storages made outside layers (RoPE's cos/sin) stay layer -1
                s = t.untyped_storage()
                ptr, old = s.data_ptr(), self.refs.get(s.data_ptr())
                if ptr not in self.params and s.nbytes() and (old is None or old[1].expired()):
                    self.refs[ptr] = (self.layer, StorageWeakRef(s), s.nbytes())  # addresses are reused
        return out

    def kept(self) -> dict[int, int]:
        by = defaultdict(int)
        for layer, ref, n in self.refs.values():
            if not ref.expired() and layer >= 0:
                by[layer] += n
        for h in self.hooks:
            h.remove()
        return dict(by)


def kept_bytes_per_layer(model, ids) -> dict[int, int]:
    rec = _KeptByLayer(model)
    with rec:
        loss = model(input_ids=ids, labels=ids).loss
    kept = rec.kept()
    del loss
    return kept


def _variants(tiny_model, dropout):
    none = _lora_model(tiny_model, dropout)
    layer, sel = copy.deepcopy(none), copy.deepcopy(none)
    enable_checkpointing(layer, None, "layer")
    enable_checkpointing(sel, None, "selective")
    return none, layer, sel


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_selective_gradients_equal_none_and_layer(tiny_model, dropout):
    ids = torch.randint(3, 200, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    models = _variants(tiny_model, dropout)
    grads = []
    for m in models:
        torch.manual_seed(123)  # the same dropout masks in every variant (checkpointing replays the RNG state)
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0] and all(g is not None for g in grads[0].values())
    for g in grads[1:]:
        for n, ref in grads[0].items():
            torch.testing.assert_close(g[n], ref, rtol=1e-5, atol=1e-7, msg=n)
    if dropout:  # dropout really acted: another draw gives other gradients
        m = models[2]
        m.zero_grad()
        torch.manual_seed(7)
        m(input_ids=ids, labels=ids).loss.backward()
        n = next(k for k in grads[0] if "lora_A" in k)
        assert not torch.allclose(dict(m.named_parameters())[n].grad, grads[0][n])


def test_policy_keeps_matmul_and_attention_outputs(tiny_model):
    """Per decoder layer: 7 base projections + 7 LoRA A matmuls saved, 7 LoRA B matmuls (K = r) recomputed, one
    attention kernel saved; norms, SiLU, RoPE and dropout recomputed."""
    m = _lora_model(tiny_model, 0.1)
    decisions = defaultdict(int)
    enable_checkpointing(m, None, "selective")
    ctx = sc.context_fn(sc.lora_small_k(m), lambda op, p, out: decisions.__setitem__(
        (sc._op_name(op)[1], p.name), decisions[(sc._op_name(op)[1], p.name)] + 1))
    for b in checkpointed_blocks(m.get_base_model()):
        b._gradient_checkpointing_func.keywords["context_fn"] = ctx
    assert sc.lora_small_k(m) == RANK
    ids = torch.randint(3, 200, (BATCH, SEQ))
    m(input_ids=ids, labels=ids).loss.backward()
    L = len(checkpointed_blocks(m.get_base_model()))
    assert decisions[("mm", "MUST_SAVE")] == 14 * L and decisions[("mm", "MUST_RECOMPUTE")] == 7 * L
    assert sum(v for (op, p), v in decisions.items() if "attention" in op and p == "MUST_SAVE") == L
    assert all(p != "MUST_SAVE" for (op, p) in decisions if op in ("silu", "rsqrt", "mul", "bernoulli_", "add"))


def test_bitsandbytes_ops_are_recomputed_and_attention_saved():
    from torch.utils.checkpoint import CheckpointPolicy
    a, b = torch.zeros(4, 512), torch.zeros(512, 8)
    assert sc.decide(torch.ops.aten.mm.default, (a, b), 16) == CheckpointPolicy.MUST_SAVE
    assert sc.decide(torch.ops.aten.mm.default, (torch.zeros(4, 16), torch.zeros(16, 512)), 16) == \
        CheckpointPolicy.MUST_RECOMPUTE
    assert sc.decide(torch.ops.aten.addmm.default, (torch.zeros(8), a, b), 16) == CheckpointPolicy.MUST_SAVE
    assert sc.decide(torch.ops.aten._scaled_dot_product_efficient_attention.default, (), 16) == \
        CheckpointPolicy.MUST_SAVE
    assert sc.decide(torch.ops.aten.native_dropout.default, (), 16) == CheckpointPolicy.PREFER_RECOMPUTE
    import bitsandbytes  # noqa: F401  (registers its torch ops)
    assert sc.decide(torch.ops.bitsandbytes.dequantize_4bit.default, (), 16) == CheckpointPolicy.MUST_RECOMPUTE
    # CPU's fused 4-bit matmul is a base projection: kept
    assert sc.decide(torch.ops.bitsandbytes.gemm_4bit.default, (a, None), 16) == CheckpointPolicy.MUST_SAVE


def _shape_and_setup(model_dir, policy: str, grad_ckpt: bool = True):
    import json
    from shardtune.model.shapes import shape_from_config
    from shardtune.plan.setup import TrainSetup
    shape = shape_from_config(json.loads((model_dir / "config.json").read_text()))
    setup = TrainSetup(method="lora", micro_batch=BATCH, seq_len=SEQ, grad_ckpt=grad_ckpt, ckpt_policy=policy,
                       precision="fp32", lora_rank=RANK, lora_dropout=0.1, kernels="none", fused_loss="none")
    return shape, setup


def test_kept_bytes_between_layer_and_none_and_match_the_planner(tiny_model):
    from shardtune.plan.activations import checkpoint_bytes_per_token_layer, selective_bytes_per_token_layer
    ids = torch.randint(3, 200, (BATCH, SEQ))
    none, layer, sel = _variants(tiny_model, 0.1)
    kept = {name: kept_bytes_per_layer(m, ids) for name, m in (("none", none), ("layer", layer), ("sel", sel))}
    tokens = BATCH * SEQ
    # layer 0 of every variant; the last layer's output feeds the final norm in all three (same bytes)
    n0, l0, s0 = kept["none"][0], kept["layer"][0], kept["sel"][0]
    print(f"kept bytes per token, layer 0: none {n0 / tokens:.0f}, selective {s0 / tokens:.0f}, layer {l0 / tokens:.0f}")
    assert l0 < s0 < n0
    # layer checkpointing keeps only the layer's output (the next layer's input)
    shape, setup = _shape_and_setup(tiny_model("llama"), "layer")
    assert l0 == checkpoint_bytes_per_token_layer(shape, setup) * tokens
    # selective keeps the 7 base projection outputs, 7 rank-r LoRA A outputs, attention output + lse, layer output
    shape, setup = _shape_and_setup(tiny_model("llama"), "selective")
    e, h = 4, shape.hidden
    matmuls = e * (2 * shape.q_dim + 2 * shape.kv_dim + 2 * shape.intermediate + h)
    assert s0 >= (matmuls + 7 * e * RANK) * tokens  # fails if the policy saved nothing
    assert s0 < 0.8 * n0                              # fails if it saved everything
    planned = selective_bytes_per_token_layer(shape, setup) * tokens
    assert s0 == pytest.approx(planned, rel=0.05), (s0, planned)


@pytest.mark.parametrize("targets, hazard", [("all-linear", False), (["v_proj", "o_proj"], True), (None, True)],
                         ids=["all-linear", "no-q-k", "full"])
def test_inplace_rope_hazard_names_the_unadapted_projection(tiny_model, targets, hazard):
    """Liger's RoPE rotates q/k in place: with no LoRA on q_proj/k_proj the kept matmul output itself would be
    rotated, so the trainer refuses that combination (shardtune/train/loop.py) with the module's name."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    if targets is not None:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    bad = sc.inplace_rope_hazard(model)
    assert (bad is not None) == hazard
    if hazard:
        assert bad.endswith("q_proj")
