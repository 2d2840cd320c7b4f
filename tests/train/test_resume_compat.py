"""Which engine may continue which checkpoint (shardtune.train.checkpoint.resume_problem)."""

from __future__ import annotations

import pytest

from shardtune.train.checkpoint import resume_problem


@pytest.mark.parametrize("saved, strategy, world", [
    ({"strategy": "none", "world_size": 1}, "ddp", 4),         # one replicated file serves both
    ({"strategy": "ddp", "world_size": 2}, "none", 1),
    ({"strategy": "fsdp", "world_size": 2}, "fsdp", 1),        # torch's distributed checkpoint re-shards
    ({"strategy": "fsdp", "world_size": 2}, "fsdp", 8),
    ({"strategy": "deepspeed", "world_size": 2}, "deepspeed", 2),
    ({}, "none", 1),                                           # checkpoints from before engine.json: not checked
])
def test_compatible(saved, strategy, world):
    assert resume_problem(saved, strategy, world) is None


@pytest.mark.parametrize("saved, strategy, world, needles", [
    ({"strategy": "fsdp", "world_size": 2}, "none", 1, ["parallel.strategy=fsdp on 2", "uses none"]),
    ({"strategy": "deepspeed", "world_size": 2}, "fsdp", 2, ["parallel.strategy=deepspeed"]),
    ({"strategy": "deepspeed", "world_size": 2}, "deepspeed", 4, ["same number of ranks", "launch 2 processes"]),
])
def test_incompatible_names_both_sides_and_the_fix(saved, strategy, world, needles):
    msg = resume_problem(saved, strategy, world)
    assert msg and "train.resume=false" in msg
    for n in needles:
        assert n in msg, msg
