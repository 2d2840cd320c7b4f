"""The HF stack's full-logits loss on the CPU: the planner's 12 bytes per logit against transformers' own loss.

`--stack hf` plans the cross-entropy over fp32 logits at 12 B per logit (log-softmax output, its incoming gradient
and the gradient it produces). Measured here with the profiler's allocator events on a one-layer Llama whose
vocabulary dominates: 12 B when the model output is dropped before backward (HF Trainer's compute_loss returns only
the loss), 16 B with fp32 logits when the output object lives through backward (a training loop that keeps
`output = model(...)` and calls `output.loss.backward()`): the logits stay alive. docs/planner.md uses the second
number to read Unsloth's HF+FA2 context table.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from shardtune.plan.constants import DEFAULT_CONSTANTS  # noqa: E402

V, T = 32000, 512


def _peak_live_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def test_hf_loss_bytes_per_logit():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=V, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg)          # fp32 throughout, as peft's kbit upcast leaves the LM head
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(True)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(0))

    def trainer_style():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def output_kept():
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    per_logit = {}
    for name, fn in (("trainer", trainer_style), ("kept", output_kept)):
        fn()
        per_logit[name] = _peak_live_bytes(fn) / (T * V)
    print(f"HF loss: {per_logit['trainer']:.2f} B/logit (HF Trainer), {per_logit['kept']:.2f} (output kept)")
    assert per_logit["trainer"] == pytest.approx(DEFAULT_CONSTANTS.loss_bytes_per_logit, rel=0.03)
    assert per_logit["kept"] == pytest.approx(DEFAULT_CONSTANTS.loss_bytes_per_logit + 4, rel=0.03)
