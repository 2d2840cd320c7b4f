"""train.checkpoint_layers: only N decoder layers recompute; gradients are those of the uncheckpointed model."""

from __future__ import annotations

import copy

import torch

from support import saved_activation_bytes

from shardtune.model.load import checkpointed_blocks, enable_checkpointing, spread


def test_spread_is_even_and_exact():
    assert spread(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert spread(32, 24) == sorted(set(spread(32, 24))) and len(spread(32, 24)) == 24
    assert spread(5, 0) == [] and spread(5, 5) == [0, 1, 2, 3, 4]


def test_some_layers_recompute_and_gradients_match(tiny_model):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32)
    base.train()
    ids = torch.randint(3, 200, (2, 16))
    ckpt = copy.deepcopy(base)
    assert enable_checkpointing(ckpt, layers=1) == 1
    assert [b.gradient_checkpointing for b in checkpointed_blocks(ckpt)] == [True, False]
    every = copy.deepcopy(base)
    assert enable_checkpointing(every) == 2  # unset: every layer
    # what autograd keeps: one recomputed layer keeps less than none, more than both
    assert saved_activation_bytes(base, ids) > saved_activation_bytes(ckpt, ids) > saved_activation_bytes(every, ids)
    for m in (base, ckpt):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    for (n, p), (_, q) in zip(base.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
