"""bench/realdata_bench.py on CPU (tiny shape, LoRA, a few steps): both trainers run on the same samples, and the
per-step counts (samples, labelled / unlabelled real tokens, padding) add up and match the batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import load_bench_module


@pytest.fixture(scope="module")
def bench():
    return load_bench_module("realdata_bench")


def spider_like(path: Path, n: int = 40) -> Path:
    """Alpaca records shaped like Spider's: schema prompts of very different lengths, short SQL answers."""
    rng = random.Random(0)
    words = "stadium singer concert name capacity country year age song theme location average".split()
    recs = []
    for i in range(n):
        schema = " ".join(f"Table t{j} has columns such as {', '.join(rng.sample(words, 4))}."
                          for j in range(rng.randint(1, 20)))
        recs.append({"instruction": f"db{i} contains tables. {schema}", "input": f"How many {rng.choice(words)}?",
                     "output": "select count(*) from t0" + " where age > 1" * rng.randint(0, 5)})
    path.write_text(json.dumps(recs))
    return path


def test_batch_counts_by_hand(bench):
    from shardtune.data.pipeline import collate
    a = {"input_ids": [1, 5, 6, 7, 8], "labels": [-100, -100, -100, 7, 8], "position_ids": [0, 1, 2, 3, 4]}
    b = {"input_ids": [1, 9, 4], "labels": [-100, -100, 4], "position_ids": [0, 1, 2]}
    row1 = {k: a[k] + b[k] for k in a}                       # two samples packed in one row of 8
    row2 = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6], "position_ids": [0, 1, 2]}
    c = bench.batch_counts([row1, row2], collate([row1, row2], pad_id=0))
    assert c == {"rows": 2, "width": 8, "samples": 3, "labelled": 5, "unlabelled": 6, "padding": 5,
                 "labelled_padding": 0}
    unpacked = [{k: v for k, v in s.items() if k != "position_ids"} for s in (a, b)]
    c = bench.batch_counts(unpacked, collate(unpacked, pad_id=0))
    assert c == {"rows": 2, "width": 5, "samples": 2, "labelled": 3, "unlabelled": 5, "padding": 2,
                 "labelled_padding": 0}


def test_bad_variant_is_one_line(bench):
    with pytest.raises(SystemExit, match="unknown or empty key 'rows'"):
        bench.parse_variant("st:rows=2")
    with pytest.raises(SystemExit, match="starts with 'st:' or 'peer:'"):
        bench.parse_variant("hf:mb=2")
    assert bench.parse_variant("peer:ckpt=0")["mb"] == "auto"


def test_end_to_end_cpu(bench, tmp_path):
    data = spider_like(tmp_path / "spider.json")
    seq, steps, warmup = 384, 2, 1
    out = tmp_path / "realdata.json"
    res = bench.main(["--shape", "tiny", "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup),
                      "--data", str(data), "--model-dir", str(tmp_path / "model"), "--out", str(out),
                      "--variants", "st:mb=2,method=lora", "peer:method=lora"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    st, peer = res["rows"]
    assert st["ok"] and peer["ok"], (st.get("error"), peer.get("error"))
    # both trained on the same tokenized samples: shardtune packed them, the peer got them one by one
    assert st["data"]["packing"] and st["data"]["train_samples"] == peer["data"]["train_samples"] == 40
    assert st["data"]["train_rows"] < 40
    for row in (st, peer):
        assert row["steps_measured"] == len(row["step_counts"]) == steps
        for c in row["step_counts"]:
            assert c["labelled"] + c["unlabelled"] + c["padding"] == c["rows"] * c["width"]
            assert c["labelled_padding"] == 0 and c["labelled"] > 0 and c["unlabelled"] > 0
        assert row["useful_tokens_per_s"] == pytest.approx(row["labelled_tokens_per_s"] + row["unlabelled_tokens_per_s"],
                                                           abs=0.2)
        assert row["peak_reserved_gb"] > 0 and row["median_step_s"] > 0
    for c in st["step_counts"]:
        assert c["rows"] == 2 and c["width"] <= seq and c["samples"] >= 2
    # the peer took the samples per step shardtune measured; its padded batches carry padding on variable lengths
    assert peer["micro_batch"] == round(st["samples_per_step"]) and peer["micro_batch_from"] == st["variant"]
    assert all(c["samples"] == c["rows"] == peer["micro_batch"] for c in peer["step_counts"])
    assert sum(c["padding"] for c in peer["step_counts"]) > 0 and peer["padding_fraction"] > 0
    assert peer["x_peer_useful"] == 1.0 and st["x_peer_useful"] > 0 and st["peer_reference"] == peer["variant"]
