"""The planner against real models on the CPU: exact 4-bit weight bytes of a bitsandbytes-loaded tiny Llama, and
the saved-activation + loss model against the live-allocation peak of shardtune's own model build and loss.

CPU kernels differ from CUDA in places (dropout keeps a full-width mask; peft casts the input of bitsandbytes
LoRA layers because CPU autocast is not CUDA autocast), so the activation check runs in fp32 with the CPU mask
width; the structure (what autograd keeps, when the peak happens) is the one the GPU calibration then confirms.
"""

from __future__ import annotations

import pytest
import torch

from shardtune.hardware import parse_gpus
from shardtune.model.shapes import resolve_shape
from shardtune.plan.constants import PlanConstants
from shardtune.plan.memory import predict_memory, weight_bytes
from shardtune.plan.setup import TrainSetup


def _model_bytes(model) -> int:
    """Every tensor the model holds: parameters, buffers and the bitsandbytes QuantState tensors (unique storages)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None:
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for b in model.buffers():
        add(b)
    return total


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_weight_bytes_equal_the_loaded_model(tiny_model, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    d = tiny_model("llama")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                            bnb_4bit_quant_storage=torch.float32, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(d), quantization_config=qc, device_map="cpu",
                                                 dtype=torch.float32)
    real = _model_bytes(model)
    planned = weight_bytes(resolve_shape(str(d)),
                           TrainSetup(method="qlora", precision="fp32", double_quant=double_quant)).total
    assert planned == real


def _peak_live_bytes(fn) -> int:
    """Peak of CPU allocator bytes live during fn() above what was live before it (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@pytest.fixture(scope="module")
def act_model_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM
    d = tmp_path_factory.mktemp("act-llama")
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                               max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    return d


@pytest.mark.parametrize("ckpt,dropout", [(False, 0.1), (True, 0.0)])
def test_activation_and_loss_peak_match_live_allocations(act_model_dir, ckpt, dropout):
    from shardtune.config import load_config
    from shardtune.model.load import build_model
    from shardtune.train.loss import logits_loss_sum
    cfg = load_config(None, ["train.method=lora", "train.precision=fp32", "lora.rank=8", f"lora.dropout={dropout}",
                             f"train.gradient_checkpointing={ckpt}", "train.micro_batch_size=2",
                             "data.max_seq_len=256"])
    dev = torch.device("cpu")
    model = build_model(cfg, act_model_dir, dev, torch.float32)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 1024, (2, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():
        logits_loss_sum(model, batch, torch.float32, dev).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()                                     # optimizer states exist from here on, like every later step
    measured = _peak_live_bytes(step)

    shape = resolve_shape(str(act_model_dir))
    setup = TrainSetup(method="lora", precision="fp32", micro_batch=2, seq_len=256, lora_rank=8,
                       lora_dropout=dropout, grad_ckpt=ckpt)
    c = PlanConstants(dropout_mask_bytes=None, alloc_frag_frac=0, alloc_frag_layer_frac=0, alloc_frag_min_bytes=0)
    m = predict_memory(shape, setup, parse_gpus("1xH100"), c)
    resident = sum(v for k, v in m.gpu.items() if k.startswith(("weights", "LoRA", "optimizer")))
    predicted = m.peak_allocated - resident    # what a step allocates on top of weights and optimizer states
    assert measured == pytest.approx(predicted, rel=0.05), (m.peak_phase, measured, predicted)
