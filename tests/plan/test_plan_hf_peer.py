"""`--stack hf` against the Hugging Face peer measured on our own GPUs (HF Trainer + peft + bitsandbytes, the
baseline every speed call runs): the 3B rows of bench/results/hf_peer_memory_3b_h200.json (one H200, seq 2048,
with and without checkpointing, micro batch 1-8) and the 8B peer rows of the speed benchmarks. The 3B rows fitted
the HF loss cache (4 B per logit, PlanConstants.hf_loss_cache_bytes_per_logit); the 8B rows are held out. The MLP's
fp32 outputs and the frozen head's cast copy were read from the peer's code, not fitted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from hf_peer_memory import planned  # noqa: E402


def _rows_3b():
    d = json.loads((ROOT / "bench/results/hf_peer_memory_3b_h200.json").read_text())
    return [("llama3-3b", r["ckpt"], r["mb"], r["peak_alloc_gb"], r["peak_reserved_gb"]) for r in d["rows"]]


def _rows_8b():
    seen, out = set(), []
    for f in sorted((ROOT / "bench/results").glob("speed*.json")):
        d = json.loads(f.read_text())
        if d.get("shape", "llama3-8b") != "llama3-8b" or d.get("seq", 2048) != 2048:
            continue
        for r in d.get("rows", []):
            if r.get("kind") == "peer" and r.get("ok") and not r.get("liger") and not r.get("cap_gb"):
                key = (r["ckpt"], r["micro_batch"])
                if key not in seen:
                    seen.add(key)
                    out.append(("llama3-8b", r["ckpt"], r["micro_batch"], r["peak_alloc_gb"], r["peak_reserved_gb"]))
    return out


@pytest.mark.parametrize("shape,ckpt,mb,alloc,reserved", _rows_3b() + _rows_8b())
def test_hf_profile_matches_the_measured_peer(shape, ckpt, mb, alloc, reserved):
    p = planned(shape, 2048, {"ckpt": ckpt, "mb": mb})
    assert p["alloc_gb"] == pytest.approx(alloc, rel=0.02)
    assert p["reserved_gb"] == pytest.approx(reserved, rel=0.04)


def test_the_held_out_8b_rows_are_there():
    assert {(c, m) for _, c, m, _, _ in _rows_8b()} >= {(1, 2), (0, 2), (1, 4)}
