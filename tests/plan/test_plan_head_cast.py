"""The HF stack's frozen fp32 LM head under autocast, on the CPU: what the planner counts against what autograd keeps.

peft's prepare_model_for_kbit_training leaves the LM head in fp32 and frozen. Autocast caches the compute-dtype
copy of a weight only when the weight requires grad, so this head is cast anew in each forward, but the matmul saves
that copy for the gradient of its input: a compute-dtype vocab x hidden tensor lives from the head's forward to the
head's backward. The planner counts it (AutocastCopies.frozen_head) at the end of the forward and at the start of
backward; it is what turns Unsloth's published out-of-memory for Llama-3.3-70B on 48 GB into "does not fit"
(docs/planner.md, "Published vs predicted").
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from shardtune.model.shapes import shape_from_config  # noqa: E402
from shardtune.plan.memory import autocast_copies  # noqa: E402
from shardtune.plan.setup import TrainSetup  # noqa: E402

V, H = 8000, 64


def _saved_during_forward(model, ids):
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.element_size()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    return saved


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=V, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)            # fp32 throughout, as the kbit upcast leaves embeddings, norms, head
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)   # something upstream trains
    model.enable_input_require_grads()       # what HF does with gradient checkpointing on a frozen embedding
    return cfg, model


def test_frozen_fp32_head_saves_one_compute_dtype_copy_and_the_planner_counts_it():
    cfg, model = _tiny_llama()
    ids = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(0))
    head_copies = [s for s in _saved_during_forward(model, ids) if s[0] == torch.bfloat16 and s[1] == V * H]
    assert len(head_copies) == 1, head_copies
    measured = head_copies[0][1] * head_copies[0][2]

    shape = shape_from_config(cfg.to_dict(), name="tiny")
    hf = TrainSetup(method="qlora", stack="hf", lora_dtype="fp32", precision="bf16")
    assert autocast_copies(shape, hf).frozen_head == measured
    # the QLoRA paper's script casts the head back to bf16 with bf16 LoRA; shardtune keeps it in the compute dtype;
    # a head trained through modules_to_save requires grad (autocast caches it instead)
    for other in (TrainSetup(method="qlora", stack="hf", lora_dtype="bf16"), TrainSetup(method="qlora"),
                  TrainSetup(method="qlora", stack="hf", modules_to_save=("lm_head",))):
        assert autocast_copies(shape, other).frozen_head == 0

