"""A DeepSpeed JSON's explicit values are adopted for the shardtune keys the user did not set; only a value set
explicitly on both sides that differs is an error (issue 14). Built once: the stage is known before building."""

from __future__ import annotations

import json

import pytest
import torch

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.parallel.dsconfig import adopted_from_json, build_ds_config, describe_filled, zero_stage
from shardtune.resolve import with_deepspeed_json


def _json(tmp_path, data) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_a_micro_batch_the_user_never_set_is_taken_from_the_json(tmp_path):
    path = _json(tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
                            "gradient_clipping": 0.3, "bf16": {"enabled": True},
                            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    cfg = load_config(None, [f"parallel.deepspeed_config={path}"])
    run = with_deepspeed_json(cfg)
    t, p = run.train, run.parallel
    assert (t.micro_batch_size, t.grad_accum, t.grad_clip, t.precision) == (8, 2, 0.3, "bf16")
    assert (p.zero_stage, p.offload_optimizer) == (2, True)
    assert cfg.train.micro_batch_size == 4          # the user's config object is not changed
    ds, filled = build_ds_config(cfg, 2, compute_dtype=torch.bfloat16, hidden_size=16)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
    adopted = adopted_from_json(cfg)
    assert "train.micro_batch_size=8" in adopted and "parallel.zero_stage=2" in adopted
    line = describe_filled(filled, path, adopted)
    assert "\n" not in line and "adopted from" in line and "train.micro_batch_size=8" in line


def test_an_explicit_default_still_conflicts(tmp_path):
    """Setting a key to its default value is setting it: 4 = the default micro batch, stated by the user."""
    path = _json(tmp_path, {"train_micro_batch_size_per_gpu": 8})
    cfg = load_config(None, [f"parallel.deepspeed_config={path}", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 .* train.micro_batch_size=4 "
                                          r"\(set in your config\)"):
        build_ds_config(cfg, 2, compute_dtype=torch.float32)
    cfg = load_config(None, [f"parallel.deepspeed_config={_json(tmp_path, {'gradient_clipping': 0.5})}",
                             "train.grad_clip=1.0"])
    with pytest.raises(ConfigError, match="gradient_clipping=0.5 .* train.grad_clip=1.0"):
        build_ds_config(cfg, 2, compute_dtype=torch.float32)


def test_an_explicit_offload_the_json_turns_off_conflicts(tmp_path):
    path = _json(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert with_deepspeed_json(load_config(None, [f"parallel.deepspeed_config={path}"])).parallel.offload_param
    cfg = load_config(None, [f"parallel.deepspeed_config={path}", "parallel.offload_param=false"])
    with pytest.raises(ConfigError, match="offload_param.device='cpu' .* parallel.offload_param=false"):
        build_ds_config(cfg, 2, compute_dtype=torch.float32)


def test_the_stage_is_known_before_building(tmp_path):
    assert zero_stage(load_config(None, ["parallel.zero_stage=2"])) == 2
    path = _json(tmp_path, {"zero_optimization": {"stage": 3}})
    assert zero_stage(load_config(None, [f"parallel.deepspeed_config={path}"])) == 3
    cfg = load_config(None, [f"parallel.deepspeed_config={path}"])
    ds, _ = build_ds_config(cfg, 2, compute_dtype=torch.float32, hidden_size=64, min_quant_numel=300)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 299
