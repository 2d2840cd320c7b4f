"""Partial recomputation, fused LoRA and activation offloading in the planner, checked against the H200 ladder of
bench/results/speed2_h200.json (issue 17: measured after these terms were written, see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shardtune.config import load_config
from shardtune.hardware import GiB, parse_gpus
from shardtune.plan import auto_plan, estimate

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "speed2_h200.json"


def _cfg(*extra):
    return load_config(None, ["model.name_or_path=llama-3-8b", "data.max_seq_len=2048", "train.kernels=liger",
                              "lora.rank=16", "lora.alpha=32", "lora.dropout=0.05", *extra])


def _est(*extra):
    return estimate(_cfg(*extra), parse_gpus("1xH200"))


def test_memory_falls_with_each_layer_recomputed_and_speed_with_it():
    rows = [_est("train.micro_batch_size=4", "train.gradient_checkpointing=false")]
    for k in (8, 16, 24):
        rows.append(_est("train.micro_batch_size=4", "train.gradient_checkpointing=true", f"train.checkpoint_layers={k}"))
    rows.append(_est("train.micro_batch_size=4", "train.gradient_checkpointing=true"))
    mem = [r.memory.peak_allocated for r in rows]
    tps = [r.speed.tokens_per_s for r in rows]
    assert mem == sorted(mem, reverse=True) and len(set(mem)) == len(mem)
    assert tps == sorted(tps, reverse=True) and len(set(tps)) == len(tps)
    # all 32 layers named explicitly is the same as plain checkpointing
    assert _est("train.micro_batch_size=4", "train.gradient_checkpointing=true",
                "train.checkpoint_layers=32").memory.peak_allocated == pytest.approx(mem[-1])


def test_fused_lora_saves_memory_and_costs_time():
    plain = _est("train.micro_batch_size=4", "train.gradient_checkpointing=false")
    fused = _est("train.micro_batch_size=4", "train.gradient_checkpointing=false", "train.fused_lora=true")
    assert fused.memory.peak_allocated < plain.memory.peak_allocated - 15 * GiB
    assert fused.speed.tokens_per_s < plain.speed.tokens_per_s


def test_offloading_activations_trades_memory_for_pcie_time():
    plain = _est("train.micro_batch_size=2", "train.gradient_checkpointing=false")
    off = _est("train.micro_batch_size=2", "train.gradient_checkpointing=false", "train.offload_activations=true")
    assert off.memory.peak_allocated < plain.memory.peak_allocated - 10 * GiB
    assert off.speed.parts_s["offload (PCIe)"] > 0 and off.speed.tokens_per_s < plain.speed.tokens_per_s


@pytest.mark.parametrize("row", [r for r in json.loads(RESULTS.read_text())["rows"]
                                 if r["kind"] == "st" and r["ok"] and not r["offload_activations"]],
                         ids=lambda r: r["variant"])
def test_the_h200_ladder_within_10_percent(row):
    """Every shardtune row of the ladder except offloading (whose measured speed the model does not explain)."""
    e = _est(f"train.micro_batch_size={row['micro_batch']}", f"train.gradient_checkpointing={bool(row['ckpt'])}",
             f"train.checkpoint_layers={row['checkpoint_layers'] or 'null'}",
             f"train.fused_lora={bool(row['fused_lora'])}")
    assert e.memory.peak_reserved / (row["peak_reserved_gb"] * 1e9) == pytest.approx(1, abs=0.06)
    assert e.speed.tokens_per_s / row["tokens_per_s"] == pytest.approx(1, abs=0.10)


def test_auto_under_a_24gb_cap_recomputes_and_the_overrides_say_how():
    res = auto_plan(_cfg("plan.global_batch_size=8"), parse_gpus("1xH200@24GB"))
    s = res.best.setup
    assert s.grad_ckpt and res.best.memory.peak_reserved <= 24 * GiB
    big = auto_plan(_cfg("plan.global_batch_size=8"), parse_gpus("1xH200@45GB")).best.setup
    assert big.grad_ckpt and 0 < big.ckpt_layers < 32  # partial recomputation wins in between
    from shardtune.plan.report import config_overrides
    ov = config_overrides(big)
    assert f"train.checkpoint_layers={big.ckpt_layers}" in ov
    assert ("train.fused_lora=true" in ov) == big.fused_lora


ROUND3 = RESULTS.with_name("speed3_h200.json")


@pytest.mark.parametrize("row", [r for r in json.loads(ROUND3.read_text())["rows"]
                                 if r["kind"] == "st" and r["ok"] and r["offload_activations"]],
                         ids=lambda r: r["variant"])
def test_offloading_rows_of_round_three(row):
    """Offloading with the pinned pool (bench/results/speed3_h200.json): the PCIe model (each direction overlaps its
    own pass, 63 GB/s x pcie_eff on the H200, whose probe measured 53 / 52 GB/s) within 10% on tokens/s. Memory: with
    checkpointing within 6% reserved; without, allocated within 20% (reserved is under-predicted: copies back are
    allocated in the side stream's own pool, not modelled, docs/benchmarks.md)."""
    e = _est(f"train.micro_batch_size={row['micro_batch']}", f"train.gradient_checkpointing={bool(row['ckpt'])}",
             f"train.fused_lora={bool(row['fused_lora'])}", "train.offload_activations=true")
    assert e.speed.tokens_per_s / row["tokens_per_s"] == pytest.approx(1, abs=0.10)
    if row["ckpt"]:
        assert e.memory.peak_reserved / (row["peak_reserved_gb"] * 1e9) == pytest.approx(1, abs=0.06)
    else:
        assert e.memory.peak_allocated / (row["peak_alloc_gb"] * 1e9) == pytest.approx(1, abs=0.20)


ONE_RANK = {"fsdp": "d8b_fsdp_mb2_ckpt1_1rank.json", "ds3": "d8b_deepspeed_mb2_ckpt1_1rank.json",
            "leaf": "d8b_deepspeed_leaf_mb2_ckpt1_1rank.json"}


def test_zero3_leaf_layers_cut_the_hook_time():
    """parallel.zero3_leaf_layers: one ZeRO-3 hook per decoder layer instead of ~40 submodules (each parameter is
    still fetched and released: host_zero3_leaf_param_s, fitted on the leaf record). Against one H200 rank of each
    engine (bench/results/d8b_*_1rank.json): FSDP2 and per-module ZeRO-3 are held out, within 10%."""
    from shardtune.plan.calibrate import load_records
    mb2 = ("train.micro_batch_size=2", "train.gradient_checkpointing=true")
    est = {"fsdp": _est(*mb2, "parallel.strategy=fsdp"),
           "ds3": _est(*mb2, "parallel.strategy=deepspeed", "parallel.zero_stage=3"),
           "leaf": _est(*mb2, "parallel.strategy=deepspeed", "parallel.zero_stage=3", "parallel.zero3_leaf_layers=true")}
    assert est["leaf"].setup.zero3_leaf and not est["ds3"].setup.zero3_leaf
    assert not _est(*mb2, "parallel.strategy=fsdp", "parallel.zero3_leaf_layers=true").setup.zero3_leaf
    for key, name in ONE_RANK.items():
        (rec,) = load_records([RESULTS.with_name(name)])
        assert rec.setup.zero3_leaf == (key == "leaf")
        assert est[key].speed.tokens_per_s / rec.tokens_per_s == pytest.approx(1, abs=0.10), key
    assert est["ds3"].speed.tokens_per_s < est["leaf"].speed.tokens_per_s < est["fsdp"].speed.tokens_per_s


def test_offload_layers_moves_whole_layers_and_hides_under_compute():
    """train.offload_layers=n: n whole layers' saved activations cross PCIe; few enough hide under the forward and
    backward (no exposed PCIe time), and memory falls by about those layers less the in-flight window."""
    from shardtune.plan.activations import activation_bytes_per_token_layer
    from shardtune.plan.speed import activation_bytes_moved
    base = ("train.micro_batch_size=4", "train.gradient_checkpointing=true", "train.checkpoint_layers=16",
            "train.fused_lora=true")
    plain = _est(*base)
    off = _est(*base, "train.offload_activations=true", "train.offload_layers=10")
    per_layer = activation_bytes_per_token_layer(off.shape, off.setup) * off.setup.tokens
    assert activation_bytes_moved(off.shape, off.setup) == pytest.approx(10 * per_layer)
    saved = plain.memory.peak_allocated - off.memory.peak_allocated
    assert 10 * per_layer - (2 * 2**30 + per_layer) <= saved + 1e6 and saved < 10 * per_layer  # backward window
    assert off.speed.parts_s["offload (PCIe)"] == 0 and off.speed.tokens_per_s == pytest.approx(plain.speed.tokens_per_s)
    # more layers than do not recompute: capped at the 16 that keep their activations
    many = _est(*base, "train.offload_activations=true", "train.offload_layers=99")
    assert activation_bytes_moved(many.shape, many.setup) == pytest.approx(16 * per_layer)


def test_unvalidated_offload_memory_says_so():
    """The two offload setups whose reserved memory the H200 runs contradicted carry a note saying so."""
    layers = _est("train.micro_batch_size=4", "train.gradient_checkpointing=true", "train.checkpoint_layers=16",
                  "train.offload_activations=true", "train.offload_layers=10")
    assert any("offload_layers: memory not validated" in n for n in layers.memory.notes)
    whole = _est("train.micro_batch_size=2", "train.gradient_checkpointing=false", "train.offload_activations=true")
    assert any("under-planned" in n for n in whole.memory.notes)
    ckpt = _est("train.micro_batch_size=4", "train.gradient_checkpointing=true", "train.offload_activations=true")
    assert not any("offload" in n for n in ckpt.memory.notes)


def test_offloaded_activations_count_in_cpu_ram():
    """The pinned pool holds every byte one micro batch moves (buckets round up by at most 1/8), so an offload plan
    counts it in CPU RAM and, like every offload plan, needs the node's RAM known."""
    from shardtune.plan.speed import activation_bytes_moved
    args = ("train.micro_batch_size=2", "train.gradient_checkpointing=false", "train.offload_activations=true")
    e = _est(*args)
    pinned = e.memory.cpu["offloaded activations (pinned)"]
    assert pinned == pytest.approx(1.125 * activation_bytes_moved(e.shape, e.setup), rel=1e-6)
    assert not e.fits and "cpu" in (e.why_not() or "").lower()  # RAM unknown: never assumed
    e64 = estimate(_cfg(*args), parse_gpus("1xH200", cpu_ram_bytes=64 * 10**9))
    assert e64.fits and "offloaded activations (pinned)" in e64.memory.cpu
    assert "offloaded activations (pinned)" not in _est("train.micro_batch_size=2").memory.cpu
