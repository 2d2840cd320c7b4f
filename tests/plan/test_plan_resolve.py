"""One resolver per decision (shardtune/resolve.py): plan, train and doctor resolve strategy, precision, fusable
heads and the loss path alike, and the plan reads a DeepSpeed JSON the way the trainer does."""

from __future__ import annotations

import json

import pytest

from shardtune.config import load_config
from shardtune.errors import ConfigError, EnvironmentProblem
from shardtune.hardware import parse_gpus
from shardtune.plan import auto_plan, estimate
from shardtune.resolve import resolve_loss_path, resolve_precision, resolve_strategy


def _cfg(*overrides):
    return load_config(None, ["model.name_or_path=llama-3-8b", "data.max_seq_len=2048", *overrides])


def _ds_json(tmp_path, data) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_auto_strategy_with_a_deepspeed_json_is_planned_as_deepspeed(tmp_path):
    """The planner's own copy of the rule ignored parallel.deepspeed_config and planned FSDP."""
    path = _ds_json(tmp_path, {"zero_optimization": {"stage": 2}})
    est = estimate(_cfg(f"parallel.deepspeed_config={path}"), parse_gpus("2xH100"))
    assert est.setup.strategy == "deepspeed"
    assert est.setup.zero_stage == 2            # the JSON's stage, as the engine will run it
    assert estimate(_cfg(), parse_gpus("2xH100")).setup.strategy == "fsdp"


def test_plan_adopts_the_jsons_batch_shape_and_offload(tmp_path):
    path = _ds_json(tmp_path, {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5,
                               "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    s = estimate(_cfg(f"parallel.deepspeed_config={path}"), parse_gpus("2xH100")).setup
    assert (s.strategy, s.zero_stage, s.micro_batch, s.grad_accum, s.offload_optimizer) == ("deepspeed", 3, 3, 5, True)
    # a key the user set keeps the user's value (build_ds_config reports the conflict when they differ)
    s = estimate(_cfg(f"parallel.deepspeed_config={path}", "train.micro_batch_size=2"), parse_gpus("2xH100")).setup
    assert s.micro_batch == 2 and s.grad_accum == 5


def test_auto_plan_with_a_deepspeed_json_keeps_what_the_json_decides(tmp_path):
    path = _ds_json(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
    res = auto_plan(_cfg(f"parallel.deepspeed_config={path}", "plan.global_batch_size=8"), parse_gpus("2xH100"))
    s = res.best.setup
    assert (s.strategy, s.zero_stage, s.micro_batch) == ("deepspeed", 3, 2)
    # the returned config runs: its choices are explicit, so the JSON cannot override them
    assert resolve_strategy(res.config, 2) == "deepspeed"
    assert {"train.micro_batch_size", "parallel.zero_stage"} <= res.config.explicit_keys


def test_an_explicit_other_strategy_next_to_a_deepspeed_json_is_an_error(tmp_path):
    path = _ds_json(tmp_path, {})
    for strategy in ("fsdp", "ddp", "none"):
        with pytest.raises(ConfigError, match=f"parallel.strategy={strategy}; set parallel.strategy=deepspeed"):
            resolve_strategy(_cfg(f"parallel.deepspeed_config={path}", f"parallel.strategy={strategy}"), 2)
        with pytest.raises(ConfigError, match="parallel.deepspeed_config"):
            estimate(_cfg(f"parallel.deepspeed_config={path}", f"parallel.strategy={strategy}"), parse_gpus("2xH100"))


def test_strategy_none_on_several_gpus_names_the_fix_for_plan_and_train():
    with pytest.raises(ConfigError, match="the plan is for 2 GPUs; use parallel.strategy=ddp"):
        estimate(_cfg("parallel.strategy=none"), parse_gpus("2xH100"))
    with pytest.raises(ConfigError, match="2 processes were launched; use parallel.strategy=ddp"):
        resolve_strategy(_cfg("parallel.strategy=none"), 2)


def test_precision_is_one_rule_for_plan_train_and_doctor(monkeypatch):
    import torch

    from shardtune import doctor
    from shardtune.model.load import resolve_precision as train_precision
    # plan: V100 has no bf16
    assert estimate(_cfg(), parse_gpus("1xV100-32GB")).setup.precision == "fp16"
    with pytest.raises(EnvironmentProblem, match="V100-32GB has no bfloat16; use train.precision=fp16"):
        estimate(_cfg("train.precision=bf16"), parse_gpus("1xV100-32GB"))
    # train: the same answers through torch's view of the GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "V100-32GB")
    assert train_precision(_cfg().train, torch.device("cuda", 0)) == torch.float16
    with pytest.raises(EnvironmentProblem, match="V100-32GB has no bfloat16; use train.precision=fp16"):
        train_precision(_cfg("train.precision=bf16").train, torch.device("cuda", 0))
    # doctor: the resolver's refusal becomes a FAIL with its fix
    gpu = doctor.GpuInfo(0, "V100-32GB", (7, 0), 32 * 2 ** 30, None)
    checks = {c.name: c for c in doctor.check_gpus([gpu], doctor.Needs(precision="bf16", cuda=True))}
    assert checks["precision"].status == doctor.FAIL and "train.precision=fp16" in checks["precision"].fix
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    with pytest.raises(EnvironmentProblem, match="on CPU"):
        resolve_precision("fp16", on_gpu=False)


def test_fusable_heads_are_one_list():
    from shardtune.resolve import FUSABLE_HEAD_TYPES
    from shardtune.train.loss import PLAIN_HEAD_TYPES
    assert PLAIN_HEAD_TYPES is FUSABLE_HEAD_TYPES
    assert resolve_loss_path(True, "gemma2", True) == "none"      # softcapped head: full logits
    assert resolve_loss_path(True, "llama", False) == "chunked"
    assert resolve_loss_path(False, "llama", True) == "none"


def test_auto_and_manual_plan_the_same_loss_path():
    """The manual plan assumed Liger on named GPUs while auto asked whether this machine has it installed."""
    cfg = _cfg("train.micro_batch_size=2", "train.gradient_checkpointing=true", "plan.global_batch_size=2")
    hw = parse_gpus("1xH100")
    manual = estimate(cfg, hw)
    auto = auto_plan(cfg, hw)
    assert auto.best.setup.fused_loss == manual.setup.fused_loss == "liger"
    same = [e for e in [auto.best, auto.runner_up] if e is not None and e.setup == manual.setup]
    for e in same:
        assert e.memory.peak_reserved == manual.memory.peak_reserved
