"""`shardtune train` with train.checkpoint_policy=selective on CPU: QLoRA (4-bit dequantization recomputed) with
fused LoRA and dropout trains, with the same losses as layer checkpointing; the config refuses what is not
supported in one line."""

from __future__ import annotations

import pytest

from support import load_bench_module, run_overrides

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.train.loop import train


def _losses(tiny_model, alpaca_file, out, policy):
    cfg = load_config(None, run_overrides(tiny_model("llama"), alpaca_file, out, **{
        "train.method": "qlora", "train.max_steps": 8, "train.gradient_checkpointing": True,
        "train.checkpoint_policy": policy, "train.fused_lora": True, "lora.dropout": 0.1}))
    return train(cfg, out=lambda *_: None).losses


def test_selective_qlora_trains_like_layer_checkpointing(tiny_model, alpaca_file, tmp_path):
    sel = _losses(tiny_model, alpaca_file, tmp_path / "sel", "selective")
    layer = _losses(tiny_model, alpaca_file, tmp_path / "layer", "layer")
    assert len(sel) == 8 and sum(sel[-3:]) / 3 < sum(sel[:3]) / 3 - 0.2, sel
    assert sel == pytest.approx(layer, rel=1e-5), (sel, layer)


def test_config_values_and_refusals():
    assert load_config(None, []).train.checkpoint_policy == "layer"
    with pytest.raises(ConfigError, match="train.checkpoint_policy: invalid value 'some'"):
        load_config(None, ["train.checkpoint_policy=some"])
    with pytest.raises(ConfigError, match="not supported under DeepSpeed ZeRO-3.*train.checkpoint_policy=layer"):
        load_config(None, ["train.gradient_checkpointing=true", "train.checkpoint_policy=selective",
                           "parallel.strategy=deepspeed", "parallel.zero_stage=3"])
    # ZeRO-2 and unchecked runs are fine (without gradient_checkpointing the policy is ignored, as checkpoint_layers)
    load_config(None, ["train.gradient_checkpointing=true", "train.checkpoint_policy=selective",
                       "parallel.strategy=deepspeed", "parallel.zero_stage=2"])
    load_config(None, ["train.checkpoint_policy=selective", "parallel.strategy=deepspeed"])


def test_speed_bench_sac_key():
    bench = load_bench_module("speed_bench")
    v = bench.parse_variant("st:ckpt=1,mb=4,liger=1,sac=1")
    assert v["sac"] == 1 and bench.parse_variant("st:ckpt=1")["sac"] == 0
    assert bench._recomputed(v, "llama3-8b") == 0.0
    assert bench._recomputed(bench.parse_variant("st:ckpt=1"), "llama3-8b") == 1.0
