"""Finding a run's adapter and base, loading them, and the errors for each missing piece."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shardtune.errors import ModelError
from shardtune.export.adapter import load_for_inference, load_run


def test_load_run_from_run_dir_and_from_adapter_dir(tiny_run):
    info = load_run(tiny_run.run_dir)
    assert info.adapter_dir == tiny_run.run_dir / "adapter"
    assert info.base_model == str(tiny_run.base_dir)
    assert info.method == "lora" and info.data_format == "alpaca" and info.run_dir == tiny_run.run_dir
    # the run's adapter/ directly: the run record next to it is still used
    info2 = load_run(tiny_run.run_dir / "adapter")
    assert info2.run_dir == tiny_run.run_dir and info2.data_format == "alpaca"


def test_bare_peft_adapter_uses_base_from_adapter_config(tiny_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run.run_dir / "adapter", bare)
    info = load_run(bare)
    assert info.run_dir is None and info.config == {}
    assert info.base_model == json.loads((bare / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_errors_name_the_input_and_the_fix(tiny_run, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_run(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="neither"):
        load_run(empty)
    # a run whose adapter directory is gone
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run.run_dir / "shardtune_run.json", run)
    with pytest.raises(ModelError, match="no adapter/ directory"):
        load_run(run)
    # an adapter directory without adapter_config.json
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_run(run)
    # a base model that moved away
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run.run_dir, moved)
    rec = json.loads((moved / "shardtune_run.json").read_text())
    rec["base_model_dir"] = str(tmp_path / "gone" / "base")
    (moved / "shardtune_run.json").write_text(json.dumps(rec))
    with pytest.raises(ModelError) as e:
        load_run(moved)
    msg = str(e.value)
    assert str(tmp_path / "gone" / "base") in msg and "--base DIR" in msg and "\n" not in msg
    # ... and --base fixes it
    assert load_run(moved, base=tiny_run.base_dir).base_model == str(tiny_run.base_dir)


def test_loaded_adapter_reproduces_the_saved_model(tiny_run):
    model, tok = load_for_inference(tiny_run.run_dir, device="cpu")
    assert not model.training
    with torch.no_grad():
        logits = model(tiny_run.probe).logits
    torch.testing.assert_close(logits, tiny_run.peft_logits, atol=1e-5, rtol=1e-5)
    # and the adapter really changes the base's output
    assert (logits - tiny_run.base_logits).abs().max() > 1e-2
    assert tok.pad_token_id is not None


def test_qlora_run_loads_on_a_4bit_base(run_copy, tiny_run):
    import bitsandbytes as bnb

    model, _ = load_for_inference(run_copy(method="qlora"), device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        logits = model(tiny_run.probe).logits
    # NF4 rounding of the base perturbs the output a little, not a lot
    err = (logits - tiny_run.peft_logits).abs().max().item()
    spread = tiny_run.peft_logits.abs().max().item()
    assert 0 < err < 0.25 * spread
    # load_in_4bit=False keeps the qlora run on the full-precision base
    model32, _ = load_for_inference(run_copy(method="qlora"), device="cpu", load_in_4bit=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model32.modules())


def test_full_finetune_run_loads_the_saved_model(tiny_run, tmp_path):
    # method=full writes the whole model where the adapter would be
    run = tmp_path / "full"
    shutil.copytree(tiny_run.base_dir, run / "adapter")
    rec = json.loads((tiny_run.run_dir / "shardtune_run.json").read_text())
    rec.update(method="full", base_model_dir=str(tmp_path / "not-needed"))
    (run / "shardtune_run.json").write_text(json.dumps(rec))
    info = load_run(run)
    assert info.is_full and info.base_model == str(run / "adapter")
    model, _ = load_for_inference(run, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(tiny_run.probe).logits, tiny_run.base_logits, atol=1e-5, rtol=1e-5)
