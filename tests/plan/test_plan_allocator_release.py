"""Reserved memory at the device limit, and the two Answer.AI stack terms (issue 15).

torch's caching allocator keeps freed segments cached while the device has room; when cudaMalloc fails it releases
every cached segment that holds no live block and retries before raising out-of-memory (the header comment of
c10/cuda/CUDACachingAllocator.cpp). So the sharded engines' extra cache (collective streams' buffers, the loss
spike's freed segments) is not a requirement: a run whose reserved-with-room prediction is above the device still
runs, with reserved stopped at the device, when the allocated bytes plus the split blocks it cannot release fit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.hardware import GiB, parse_gpus
from shardtune.model.shapes import resolve_shape
from shardtune.plan import estimate
from shardtune.plan.constants import DEFAULT_CONSTANTS as C
from shardtune.plan.memory import predict_memory
from shardtune.plan.setup import TrainSetup

SHAPE = resolve_shape("Llama-2-7B")
FSDP = dict(method="qlora", strategy="fsdp", world_size=2, gpus_per_node=2, micro_batch=12, seq_len=2048,
            grad_ckpt=True, lora_rank=64)
FIXED = C.cuda_context_bytes + C.nccl_bytes


def _mem(gpus: str, **kw):
    return predict_memory(SHAPE, TrainSetup(**{**FSDP, **kw}), parse_gpus(gpus))


def test_reserved_with_room_is_unchanged_where_the_device_has_room():
    big = _mem("2xH200")
    held_only = _mem("2xH200", strategy="ddp")      # no sharded cache: reserved is the held part alone
    cache = (big.peak_reserved - big.peak_allocated) - (held_only.peak_reserved - held_only.peak_allocated)
    assert cache > C.shard_slack_bytes
    assert not any("releasable cache" in n for n in big.notes)


def test_the_releasable_cache_stops_at_the_device_and_the_run_fits():
    room = _mem("2xH200").peak_reserved
    small = _mem("2xRTX4090")
    budget = parse_gpus("2xRTX4090").gpu_memory_bytes
    assert room + FIXED > budget                                  # the reading with room would not fit
    assert small.peak_reserved == budget - FIXED                  # the cache is given back at the device
    assert small.usage_vs_budget == budget and small.reserved_held + FIXED < budget
    assert small.to_dict()["reserved_held"] == small.reserved_held > small.peak_allocated
    assert any("releasable cache" in n and "device limit" in n for n in small.notes)
    # with a per-process cap the same cache stops at the cap (context and NCCL lie outside it)
    capped = _mem("2xH200@22GB")
    assert capped.peak_reserved == 22 * GiB and capped.usage_vs_budget == 22 * GiB


def test_what_cannot_be_released_still_decides_does_not_fit():
    m = _mem("2xRTX4090", micro_batch=24)                         # twice the tokens: allocated alone is over
    budget = parse_gpus("2xRTX4090").gpu_memory_bytes
    assert m.peak_allocated + FIXED > budget and m.usage_vs_budget > budget
    assert m.peak_reserved < _mem("2xH200", micro_batch=24).peak_reserved   # held part only: no sharded cache


AA_CFG = ["model.name_or_path=Llama-2-7B", "train.method=qlora", "parallel.strategy=fsdp", "lora.rank=64",
          "train.micro_batch_size=12", "data.max_seq_len=2048", "train.gradient_checkpointing=true",
          "parallel.offload_param=true"]


def _aa(profile, gpus="2xRTX4090", extra=()):
    return estimate(load_config(None, AA_CFG + list(extra)), parse_gpus(gpus, cpu_ram_bytes=128 * GiB),
                    stack={"stack": "hf", "lora_dtype": "bf16", "optimizer": "adamw", **profile})


def test_a_loop_that_keeps_the_output_holds_fp32_logits_through_backward():
    plain, kept = _aa({}, "2xH200"), _aa({"keeps_output": True}, "2xH200")
    logits = 4 * 12 * 2048 * SHAPE.vocab
    assert kept.memory.peak_allocated - plain.memory.peak_allocated == pytest.approx(logits, rel=1e-6)
    # in the layer-backward phase too (the output lives until backward is done)
    ph, pk = plain.memory.phases, kept.memory.phases
    assert pk["layer backward"] - ph["layer backward"] == pytest.approx(logits, rel=1e-6)
    assert pk["end of forward"] == ph["end of forward"]


def test_fsdp_no_shard_is_replicas_with_fsdps_allocator_cache():
    ddp = ["parallel.strategy=ddp", "parallel.offload_param=false", "train.micro_batch_size=8"]
    plain, no_shard = _aa({}, "2xH200", ddp), _aa({"fsdp_no_shard": True}, "2xH200", ddp)
    assert no_shard.memory.peak_allocated == plain.memory.peak_allocated      # the same replicas
    # FSDP's cache replaces the plain HF stack's loss cache (both are releasable room above the held bytes)
    logits = 8 * 2048 * SHAPE.vocab
    assert no_shard.memory.peak_reserved - plain.memory.peak_reserved == pytest.approx(
        C.shard_slack_bytes + C.shard_slack_loss_frac * 12 * logits - C.hf_loss_cache_bytes_per_logit * logits,
        rel=1e-6)
    with pytest.raises(ConfigError, match="parallel.strategy=ddp"):
        _aa({"fsdp_no_shard": True}, "2xH200")
    with pytest.raises(ConfigError, match="--stack hf"):
        TrainSetup(keeps_output=True)


def test_answer_ais_offload_runs_that_worked_are_fits():
    """The three 2x RTX 4090 CPU-offload QLoRA runs at 24,576 tokens per step (benchmarks_03_2024.md): the
    reading with room is over 24 GiB; what the allocator cannot give back fits, so they ran (tight)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from published_runs import CASES, predict
    rows = [c for c in CASES if c[0] == "AA" and "offload qlora bs" in c[1] and ("bs12" in c[1] or "24576" in c[1])]
    assert len(rows) == 3
    for case in rows:
        est = predict(case)
        assert est.fits and est.tight, (case[1], est.why_not())
        assert est.memory.peak_reserved / GiB == pytest.approx(case[-1], rel=0.05)
