"""The planner against the GPU measurements committed under bench/results (one H100, 1B/3B/8B shapes, lora and
qlora, checkpointing on/off, micro batch 1-8, seq 512-4096): peak reserved within +-10% on every record (issue 5),
peak allocated and tokens/s checked too so a regression in any term shows. And the fitter recovers a known constant."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardtune.plan.calibrate import FITTED_ON, Record, default_paths, evaluate, fit, load_records, split_records
from shardtune.plan.constants import PlanConstants
from shardtune.plan.setup import TrainSetup
from shardtune.plan.speed import predict_speed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records():
    recs = load_records(default_paths(REPO))
    if not recs:
        pytest.skip("no calibration results committed under bench/results")
    return recs


def test_enough_committed_records(records):
    assert len(records) >= 12


def test_multi_gpu_dist_bench_records_are_read(records):
    """bench/dist_bench.py results (2xH200 fsdp/deepspeed, 1xH200 none, 70B offload under a cap) are in the table
    with their strategy, stage, offload and cap mapped, so the +-10% check below covers them."""
    dist = [r for r in records if r.source.rsplit("/", 1)[-1].startswith("d")]
    if not dist:
        pytest.skip("no dist_bench results committed")
    kinds = {(r.setup.strategy, r.setup.zero_stage if r.setup.strategy != "none" else 0, r.setup.world_size,
              r.setup.offload_param) for r in dist}
    assert {("fsdp", 3, 2, False), ("fsdp", 2, 2, False), ("deepspeed", 3, 2, False), ("none", 0, 1, False),
            ("fsdp", 3, 2, True)} <= kinds
    capped = [r for r in dist if r.setup.offload_param]
    assert all(r.hardware().memory_cap_bytes == pytest.approx(24e9, rel=1e-3) for r in capped)
    # each run's recorded loss path: fused (Liger FLCE) on the one-process engine and on the later "fused" FSDP runs
    assert all(r.setup.fused_loss == ("liger" if (r.setup.strategy == "none" or r.label.endswith(" fused"))
                                      else "none") for r in dist)
    assert sum(r.label.endswith(" fused") for r in dist) >= 2


def test_peak_reserved_within_10_percent_on_every_record(records):
    rep = evaluate(records)
    bad = [(r.record.label, round(100 * r.err("reserved"), 1)) for r in rep.rows
           if r.err("reserved") is not None and abs(r.err("reserved")) > 0.10]
    worst, err = rep.worst("reserved")
    print(f"worst peak reserved error: {100 * err:+.1f}% ({worst.record.label})")
    assert not bad, bad


def test_peak_allocated_within_5_percent_single_gpu_15_sharded(records):
    """Sharded records are looser: FSDP z3 ckpt-on and the 70B offload run are over-predicted by ~12% allocated
    (the reserved slack fitted on them absorbs it; see docs/planner.md)."""
    rep = evaluate(records)
    bad = [(r.record.label, round(100 * r.err("allocated"), 1)) for r in rep.rows if r.err("allocated") is not None
           and abs(r.err("allocated")) > (0.05 if r.record.setup.world_size == 1 else 0.15)]
    assert not bad, bad


def test_tokens_per_s_within_30_percent_single_gpu_50_sharded(records):
    """Multi-GPU speed is less settled: FSDP z3 ckpt-on +28%, 70B CPU offload +43% (not fitted). One GPU: host-bound
    configurations (8B at micro batch 2) run at the host CPU's pace, which differs between the lent machines: the
    same 1x H200 command measured from 7,553 to 8,918 tokens/s on five of them; the plan (6,342)
    under-predicts the fastest by 29%."""
    rep = evaluate(records)
    bad = [(r.record.label, round(100 * r.err("tokens_per_s"), 1)) for r in rep.rows
           if r.err("tokens_per_s") is not None
           and abs(r.err("tokens_per_s")) > (0.30 if r.record.setup.world_size == 1 else 0.50)]
    assert not bad, bad


def test_fit_recovers_a_known_matmul_efficiency():
    truth = PlanConstants(matmul_eff=0.5)
    recs = []
    for mb in (1, 2, 4, 8):
        st = TrainSetup(method="qlora", micro_batch=mb, seq_len=2048, grad_ckpt=mb > 2, kernels="liger",
                        fused_loss="liger")
        rec = Record(label=f"mb{mb}", model="Llama-3-8B", gpus="1xH100", setup=st)
        rec.tokens_per_s = predict_speed(rec.shape(), st, rec.hardware(), truth).tokens_per_s
        recs.append(rec)
    fitted = fit(recs, ["matmul_eff"], PlanConstants(matmul_eff=0.9), target="speed")
    assert fitted.matmul_eff == pytest.approx(0.5, rel=0.02)


def test_fitted_and_held_out_records_reported_separately(records):
    """Issue 15: the constants were fitted on some of these records; the ones they were not fitted on (FITTED_ON
    names the files) are the honest check. Held-out reserved within +-10%; both sets printed (pytest -s)."""
    for files in (fs for _, fs in FITTED_ON.values()):
        missing = [f for f in files if not (REPO / "bench" / "results" / f).exists()]
        assert not missing, f"fitting-set files gone: {missing}"
    fitting, held = split_records(records, "memory")
    assert len(fitting) == 20 and len(held) >= 20
    assert {r.source for r in fitting}.isdisjoint({r.source for r in held})
    for name, part in (("fitting set", fitting), ("held out", held)):
        rep = evaluate(part)
        print(f"{name}: reserved {rep.summary('reserved')}; allocated {rep.summary('allocated')}")
    rep = evaluate(held)
    bad = [(r.record.label, round(100 * r.err("reserved"), 1)) for r in rep.rows if abs(r.err("reserved")) > 0.10]
    assert not bad, bad
    # the held-out set is not only the fitted shape: it has one-GPU H200 runs and sharded runs the slack never saw
    assert any(r.setup.world_size == 1 for r in held) and any(r.setup.world_size == 2 for r in held)
    assert any(r.model == "Llama-2-70B" for r in held)
