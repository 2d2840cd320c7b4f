"""Which engine may continue which checkpoint, and which config changes stop a resume
(shardtune.train.checkpoint.resume_problem)."""

from __future__ import annotations

import pytest

from shardtune.config import RunConfig
from shardtune.train.checkpoint import RESUMABLE_CHANGES, resume_problem

FORMAT = {"none": "replicated", "ddp": "replicated", "fsdp": "sharded", "deepspeed": "deepspeed"}


def _saved(strategy, world, **changes):
    cfg = RunConfig().to_dict()
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return {"config": cfg, "strategy": strategy, "world_size": world, "state_format": FORMAT[strategy]}


def _check(saved, strategy, world):
    """This run: the same config, its micro batch rescaled so the global batch matches the saved run's."""
    cfg = RunConfig().to_dict()
    cfg["train"]["micro_batch_size"] = saved["config"]["train"]["micro_batch_size"] * saved["world_size"] // world
    return resume_problem(saved, cfg, FORMAT[strategy], strategy, world)


@pytest.mark.parametrize("saved, strategy, world", [
    (_saved("none", 1), "ddp", 4),          # one replicated copy serves both
    (_saved("ddp", 2), "none", 1),
    (_saved("fsdp", 2), "fsdp", 1),         # per-rank shards are re-cut for any rank count
    (_saved("fsdp", 2), "fsdp", 8),
    (_saved("deepspeed", 2), "deepspeed", 2),
])
def test_compatible(saved, strategy, world):
    assert _check(saved, strategy, world) is None


@pytest.mark.parametrize("saved, strategy, world, needles", [
    (_saved("fsdp", 2), "none", 1, ["parallel.strategy=fsdp on 2", "uses none"]),
    (_saved("deepspeed", 2), "fsdp", 2, ["parallel.strategy=deepspeed"]),
    (_saved("deepspeed", 2), "deepspeed", 4, ["same number of ranks", "launch 2 processes"]),
])
def test_incompatible_names_both_sides_and_the_fix(saved, strategy, world, needles):
    msg = _check(saved, strategy, world)
    assert msg and "output.overwrite=true" in msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("key, old", [("lora.rank", 8), ("train.lr", 1e-3), ("train.method", "lora"),
                                      ("quant.quant_type", "fp4"), ("model.name_or_path", "other-model"),
                                      ("data.path", "other.jsonl"), ("train.seed", 7)])
def test_a_changed_key_that_changes_the_state_is_named_old_to_new(key, old):
    msg = _check(_saved("none", 1, **{key: old}), "none", 1)
    assert msg and key in msg and repr(old) in msg and "->" in msg, msg


@pytest.mark.parametrize("key, old", [("train.max_steps", 500), ("train.log_every", 1), ("train.eval_every", 7),
                                      ("train.save_every", 3), ("output.tensorboard", False)])
def test_keys_documented_as_resumable_may_change(key, old):
    assert key in RESUMABLE_CHANGES
    assert _check(_saved("none", 1, **{key: old}), "none", 1) is None


def test_the_global_batch_may_be_split_differently_but_not_changed():
    saved = _saved("fsdp", 2, **{"train.micro_batch_size": 2})  # 2 x 1 x 2 ranks = 4 = 4 x 1 x 1 rank
    assert resume_problem(saved, RunConfig().to_dict(), "sharded", "fsdp", 1) is None
    msg = resume_problem(saved, RunConfig().to_dict(), "sharded", "fsdp", 2)  # 4 x 1 x 2 = 8
    assert msg and "global batch" in msg and "4 -> 8" in msg, msg
