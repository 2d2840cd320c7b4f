"""Fused LoRA (dropout regenerated in backward): same function and gradients as peft, fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from support import saved_activation_bytes

from shardtune.model.load import enable_checkpointing
from shardtune.model.lora_fused import LoraDropoutMatmul, _keep_mask, fuse_lora


def test_function_matches_dropout_reference_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    p, s, seed = 0.3, 0.5, 1234
    y = LoraDropoutMatmul.apply(x, a, b, s, p, seed)
    mask = _keep_mask(x, p, seed) / (1 - p)
    assert 0 < (mask == 0).double().mean() < 1  # the mask drops some entries, keeps others
    ref = ((x * mask) @ a.t() @ b.t()) * s
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    want = torch.autograd.grad(ref, (x, a, b), g)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraDropoutMatmul.apply(x, a, b, s, p, seed), (x, a, b))


def _tiny_lora(tiny_model, dropout: float):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    for n, prm in model.named_parameters():  # non-zero B so every gradient is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.05)
    return model


def _grads(model, ids, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_without_dropout_equals_peft(tiny_model):
    model = _tiny_lora(tiny_model, 0.0)
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) == 14  # 2 layers x 7 linears (lm_head is not a LoRA target)
    ids = torch.randint(3, 200, (2, 24))
    model.train(), fused.train()
    l0, g0 = _grads(model, ids)
    l1, g1 = _grads(fused, ids)
    torch.testing.assert_close(l1, l0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_dropout_replays_under_checkpointing_and_eval_is_peft(tiny_model):
    model = _tiny_lora(tiny_model, 0.2)
    ids = torch.randint(3, 200, (2, 24))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fused = copy.deepcopy(model)
    fuse_lora(fused)
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, want)  # no dropout in eval: peft's path
    fused.train()
    l_plain, g_plain = _grads(fused, ids)
    l_again, g_again = _grads(fused, ids)
    ckpt = copy.deepcopy(fused)
    enable_checkpointing(ckpt)
    l_ckpt, g_ckpt = _grads(ckpt, ids)
    # same seed -> same masks: the step is deterministic, and the checkpoint's recompute regenerates the very masks
    assert l_again == l_plain and l_ckpt == l_plain
    for n in g_plain:
        assert torch.equal(g_again[n], g_plain[n])
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7)
    torch.manual_seed(7)
    other = fused(input_ids=ids, labels=ids).loss.detach()
    torch.manual_seed(8)
    assert fused(input_ids=ids, labels=ids).loss.detach() != other  # dropout is live in training



def test_fused_keeps_fewer_activation_bytes(tiny_model):
    model = _tiny_lora(tiny_model, 0.1)
    fused = copy.deepcopy(model)
    fuse_lora(fused)
    model.train(), fused.train()
    ids = torch.randint(3, 200, (4, 64))
    plain, less = saved_activation_bytes(model, ids), saved_activation_bytes(fused, ids)
    assert less < 0.8 * plain, (plain, less)


@pytest.mark.parametrize("stage,leaf,local", [(2, False, True), (3, True, True), (3, False, False)])
def test_zero3_per_module_gathers_keep_peft_forward(stage, leaf, local):
    from shardtune.config import load_config
    from shardtune.parallel.deepspeed import DeepSpeedEngine
    from shardtune.parallel.base import DistInfo
    cfg = load_config(None, ["parallel.strategy=deepspeed", f"parallel.zero_stage={stage}",
                             f"parallel.zero3_leaf_layers={leaf}"])
    eng = DeepSpeedEngine(cfg, DistInfo(0, 1, 0), torch.device("cpu"), torch.float32)
    assert eng.local_module_params is local
