"""A finished training run on disk, made directly with peft (so export tests do not depend on the training loop)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass
class TinyRun:
    run_dir: Path
    base_dir: Path
    probe: torch.Tensor          # input ids used to compare logits
    peft_logits: torch.Tensor    # logits of the in-memory PeftModel that was saved (fp32)
    base_logits: torch.Tensor    # logits of the base alone


def write_run_json(run_dir: Path, base_dir: Path, method: str = "lora", data_format: str = "alpaca",
                   precision: str = "float32") -> None:
    from shardtune.config import RunConfig

    cfg = RunConfig()
    cfg.model.name_or_path = str(base_dir)
    cfg.train.method = method
    cfg.data.format = data_format
    cfg.output.dir = str(run_dir)
    (run_dir / "shardtune_run.json").write_text(json.dumps({
        "config": cfg.to_dict(), "base_model_dir": str(base_dir), "method": method, "precision": precision}))


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> TinyRun:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = tiny_model("llama")
    run_dir = tmp_path_factory.mktemp("run")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    probe = torch.tensor([tok("SELECT count(*) FROM singer WHERE age > 20")["input_ids"]])
    with torch.no_grad():
        base_logits = model(probe).logits.clone()
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                          task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; a real adapter is not a no-op
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        pm.eval()
        peft_logits = pm(probe).logits.clone()
    pm.save_pretrained(run_dir / "adapter")
    tok.save_pretrained(run_dir / "adapter")
    write_run_json(run_dir, base_dir)
    return TinyRun(run_dir, base_dir, probe, peft_logits, base_logits)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """copy(method=..., data_format=...) -> a fresh copy of the tiny run with another shardtune_run.json."""

    def copy(method: str = "lora", data_format: str = "alpaca", precision: str = "float32") -> Path:
        d = tmp_path / f"run-{method}-{data_format}"
        if d.exists():
            return d
        shutil.copytree(tiny_run.run_dir, d)
        write_run_json(d, tiny_run.base_dir, method=method, data_format=data_format, precision=precision)
        return d

    return copy
