"""Merging an adapter into its base, copying it, and never leaving a half-written export behind."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from shardtune.errors import ConfigError
from shardtune.export import merge as merge_mod
from shardtune.export.merge import copy_adapter, merge


def _logits(model_dir, probe):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(probe).logits


def test_merged_model_matches_base_plus_adapter(tiny_run, tmp_path):
    out = merge(tiny_run.run_dir, tmp_path / "merged", dtype="fp32")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").is_file()
    assert not (tmp_path / "merged.tmp").exists()
    # a plain transformers model now: no peft modules, same logits as base + adapter
    logits = _logits(out, tiny_run.probe)
    torch.testing.assert_close(logits, tiny_run.peft_logits, atol=1e-4, rtol=1e-4)
    assert (logits - tiny_run.base_logits).abs().max() > 1e-2
    assert json.loads((out / "shardtune_export.json").read_text())["kind"] == "merged"


def test_qlora_run_merges_into_the_full_precision_base(run_copy, tiny_run, tmp_path):
    # dequantize-and-merge: the result equals the full-precision base + adapter, not the NF4 base + adapter
    out = merge(run_copy(method="qlora"), tmp_path / "merged-q", dtype="fp32")
    torch.testing.assert_close(_logits(out, tiny_run.probe), tiny_run.peft_logits, atol=1e-4, rtol=1e-4)


def test_bf16_merge_stores_bf16(tiny_run, tmp_path):
    from safetensors import safe_open

    out = merge(tiny_run.run_dir, tmp_path / "m16", dtype="bf16")
    f = next(out.glob("*.safetensors"))
    with safe_open(str(f), "pt") as st:
        dtypes = {st.get_tensor(k).dtype for k in st.keys()}
    assert dtypes == {torch.bfloat16}
    logits = _logits(out, tiny_run.probe)
    assert (logits - tiny_run.peft_logits).abs().max() < 0.1  # bf16 rounding only


def test_failed_export_keeps_the_previous_one(tiny_run, tmp_path, monkeypatch):
    out = merge(tiny_run.run_dir, tmp_path / "merged", dtype="fp32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(self, *a, **k):
        raise OSError("disk full")

    from transformers import PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        merge(tiny_run.run_dir, out, dtype="fp32")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "merged.tmp").exists() and not (tmp_path / "merged.old").exists()


def test_refuses_to_overwrite_inputs_or_unrelated_dirs(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="would overwrite the input"):
        merge(tiny_run.run_dir, tiny_run.run_dir / "adapter", dtype="fp32")
    with pytest.raises(ConfigError, match="would overwrite the input"):
        copy_adapter(tiny_run.run_dir, tiny_run.base_dir)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="does not hold a model"):
        merge(tiny_run.run_dir, other, dtype="fp32")
    assert (other / "cat.jpg").read_bytes() == b"x"


def test_copy_adapter_loads_with_peft_under_a_new_base_name(tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = copy_adapter(tiny_run.run_dir, tmp_path / "shared", base_name="my-org/tiny-llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "my-org/tiny-llama"
    assert (out / "shardtune_run.source.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_run.base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(tiny_run.probe).logits, tiny_run.peft_logits, atol=1e-5, rtol=1e-5)


def test_cli_export(tiny_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    merge_mod.add_arguments(parser)
    args = parser.parse_args(["--adapter", str(tiny_run.run_dir), "--out", str(tmp_path / "a")])
    assert merge_mod.run(args) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert "adapter copied" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --merge and --out are exclusive, one is required
        parser.parse_args(["--adapter", str(tiny_run.run_dir)])
