"""One-process training on CPU: the loss falls, QLoRA layers are 4-bit and frozen, the adapter round-trips through peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shardtune.config import load_config
from shardtune.train.loop import Trainer, train
from support import run_overrides


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_loss_falls(arch, method, tiny_model, alpaca_file, tmp_path):
    cfg = load_config(None, run_overrides(tiny_model(arch), alpaca_file, tmp_path / "out", **{"train.method": method}))
    res = train(cfg, out=lambda *_: None)
    assert len(res.losses) == 12
    first, last = _mean(res.losses[:3]), _mean(res.losses[-3:])
    assert last < first - 0.3, f"{arch}/{method}: loss did not fall ({first:.3f} -> {last:.3f})"
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    run = json.loads((tmp_path / "out" / "shardtune_run.json").read_text())
    assert run["method"] == method and run["final_train_loss"] == pytest.approx(res.losses[-1])


def _trainer(tiny_model, alpaca_file, out, **extra):
    cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, out, **extra))
    tr = Trainer(cfg, out=lambda *_: None)
    tr.setup()
    return tr


def test_qlora_layers_are_4bit_and_only_lora_changes(tiny_model, alpaca_file, tmp_path):
    import bitsandbytes as bnb

    tr = _trainer(tiny_model, alpaca_file, tmp_path / "out", **{"train.method": "qlora", "train.max_steps": 4})
    model = tr.engine.unwrapped()
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 layers x 7 projections, every one quantized (lm_head stays in full precision)
    assert len(four_bit) == 14
    assert all(m.weight.quant_state is not None and m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    assert all(not m.weight.requires_grad for m in four_bit)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.run()
    # compare bytes: packed 4-bit data stored as float32 contains NaN bit patterns, which never compare equal
    changed = {n for n, p in model.named_parameters()
               if not torch.equal(p.detach().contiguous().view(torch.uint8), before[n].contiguous().view(torch.uint8))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "nothing trained"
    assert changed <= trainable and all("lora_" in n for n in changed), sorted(changed - trainable)[:3]
    # lora_B starts at zero and must have moved for every adapted layer
    assert {n for n in changed if "lora_B" in n} == {n for n in trainable if "lora_B" in n}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_saved_adapter_reproduces_logits_in_peft(method, tiny_model, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardtune.model.bnb_cpu import disable_cpu_weight_packing
    from shardtune.model.load import quantization_config

    tr = _trainer(tiny_model, alpaca_file, tmp_path / "out", **{"train.method": method, "train.max_steps": 6})
    tr.run()
    trained = tr.engine.unwrapped().eval()
    ids = torch.tensor([tr.train_set[0]["input_ids"][:40]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits

    kw = {"dtype": torch.float32}
    qc = quantization_config(tr.cfg, torch.float32)
    if qc is not None:
        kw.update(quantization_config=qc, device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), **kw)
    disable_cpu_weight_packing(base)  # as shardtune's loaders do: peft's loader keeps bitsandbytes' CPU repacking on
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    # the adapter changed the model: it must differ from the bare base
    with torch.no_grad(), loaded.disable_adapter():
        bare = loaded(input_ids=ids).logits
    assert (want - bare).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resume_continues_the_trajectory(tiny_model, alpaca_file, tmp_path):
    extra = {"train.method": "lora", "train.max_steps": 8, "lora.dropout": 0.0, "train.log_every": 2}
    full = train(load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "a", **extra)),
                 out=lambda *_: None)
    part = dict(extra, **{"train.save_every": 4})
    cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "b", **part))
    tr = Trainer(cfg, out=lambda *_: None)
    tr.setup()
    tr.total_steps = 5  # cut the run short after the step-4 checkpoint (as a crash would)
    tr.run()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000005")  # the crash came before the end's checkpoint
    assert (tmp_path / "b" / "checkpoints" / "step-000004" / "COMPLETE").exists()
    resumed = train(load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "b",
                                                    **dict(part, **{"train.resume": True}))), out=lambda *_: None)
    assert len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5, abs=1e-6)


def test_interrupted_run_keeps_the_good_adapter(tiny_model, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(load_config(None, run_overrides(tiny_model("llama"), alpaca_file, out, **{"train.max_steps": 2})),
          out=lambda *_: None)
    good = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # interrupted during training (continuing the run): nothing is written over the adapter
    tr = _trainer(tiny_model, alpaca_file, out, **{"train.max_steps": 6, "train.resume": True})
    calls = {"n": 0}
    real_step = tr.engine.step

    def step_then_interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(tr.engine, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == good

    # interrupted while writing the new adapter: the old one is still complete
    tr = _trainer(tiny_model, alpaca_file, out, **{"train.max_steps": 4, "train.resume": True})
    model = tr.engine.unwrapped()
    real_save = model.save_pretrained

    def save_half_then_die(path, **kw):
        real_save(path, **kw)
        if Path(path).name.startswith("adapter.tmp"):  # the final adapter (checkpoints write their own copy)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == good


def test_fp16_loss_scaling_engine_steps():
    """The fp16 path scales the loss and unscales before clipping; an inf gradient skips the step."""
    from shardtune.parallel.base import DistInfo
    from shardtune.parallel.single import SingleEngine

    cfg = load_config(None, ["train.grad_clip=1.0", "train.warmup_steps=0", "train.lr=0.1"])
    lin = torch.nn.Linear(4, 1)
    from shardtune.train.optim import build_optimizer, build_scheduler
    eng = SingleEngine(cfg, DistInfo(), torch.device("cpu"), torch.float16)
    eng.wrap(lin)
    opt = build_optimizer([p for _, p in eng.named_trainable()], cfg.train, eng.optimizer_device)
    eng.setup(opt, lambda o: build_scheduler(o, cfg.train, 10))
    assert eng.scaler is not None and eng.loss_scaling
    w0 = lin.weight.detach().clone()
    eng.backward(lin(torch.ones(2, 4)).sum())
    norm, applied = eng.step()
    assert torch.isfinite(norm) and applied and not torch.equal(lin.weight, w0)
    w1 = lin.weight.detach().clone()
    eng.backward(lin(torch.full((2, 4), float("inf"))).sum())
    eng.step()
    assert torch.equal(lin.weight, w1), "a step with inf gradients must be skipped under loss scaling"
