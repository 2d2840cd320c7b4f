"""Every issue-17 fast path has a CPU fallback: compile and offloading say they are skipped, fused LoRA and partial
recomputation run, and the run trains."""

from __future__ import annotations

import math

from support import run_overrides

from shardtune.config import load_config
from shardtune.train.loop import Trainer


def test_all_fast_paths_together_on_cpu(tiny_model, alpaca_file, tmp_path):
    lines: list[str] = []
    cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "out", **{
        "train.max_steps": 4, "train.compile": True, "train.offload_activations": True, "train.fused_lora": True,
        "train.gradient_checkpointing": True, "train.checkpoint_layers": 1, "lora.dropout": 0.1}))
    tr = Trainer(cfg, out=lambda m: lines.append(str(m)))
    tr.setup()
    res = tr.run()
    text = "\n".join(lines)
    assert "compile: train.compile needs CUDA; running eagerly" in text
    assert "train.offload_activations: needs CUDA; ignored on cpu" in text
    assert tr.fused_lora == 14 and "lora dropout: regenerated in backward (14 layers)" in text
    assert len(res.losses) == 4 and all(math.isfinite(x) for x in res.losses)
