"""bench/load_bench.py runs end to end in its --dry-run mode (tiny shapes, CPU, gloo): checkpoint written in shards
and reused, streamed load on 2 ranks with FSDP2, random 4-bit build, results JSON with per-rank numbers."""

from __future__ import annotations

import json

import torch


def test_writer_streams_shards_and_is_reused(load_bench, tmp_path):
    from safetensors.torch import load_file
    d = tmp_path / "ck"
    info = load_bench.ensure_checkpoint(d, "tiny", torch.float32, shard_bytes=100_000)
    assert not info["reused"] and info["files"] > 2
    index = json.loads((d / "model.safetensors.index.json").read_text())
    names = {n for n, _ in load_bench.checkpoint_tensors(load_bench.hf_config("tiny"))}
    assert set(index["weight_map"]) == names
    total = sum(t.numel() * t.element_size() for f in d.glob("*.safetensors") for t in load_file(str(f)).values())
    assert total == info["bytes"] == index["metadata"]["total_size"]
    again = load_bench.ensure_checkpoint(d, "tiny", torch.float32, shard_bytes=100_000)
    assert again["reused"] and again["bytes"] == info["bytes"]


def test_dry_run_two_ranks(load_bench, tmp_path):
    out = tmp_path / "load.json"
    report = load_bench.main(["--dry-run", "--nproc", "2", "--random-nproc", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["checkpoint"]["bytes"] > 0
    runs = {r["task"]: r for r in report["runs"]}
    assert set(runs) == {"ckpt", "random"}
    for run in runs.values():
        assert run["nproc"] == 2 and [r["rank"] for r in run["ranks"]] == [0, 1]
        for r in run["ranks"]:
            assert r["forward_ok"] is True
            assert r["load_seconds"] > 0 and r["peak_rss_bytes"] >= r["rss_baseline_bytes"] > 0
            assert r["loader"]["world_size"] == 2 and r["loader"]["tensors"] > 0
            assert r["param_bytes_local"] > 0
    ck = runs["ckpt"]["ranks"]
    assert ck[0]["loader"]["bytes_read"] == report["checkpoint"]["bytes"]  # every rank reads the whole checkpoint
    assert abs(ck[0]["param_bytes_local"] - ck[1]["param_bytes_local"]) < 0.1 * ck[0]["param_bytes_local"]


def test_single_process_task_in_process(load_bench, tmp_path):
    d = load_bench.write_config_dir("tiny", tmp_path / "cfg")
    r = load_bench._run_task({"kind": "random", "shape": "tiny", "dir": str(d)}, torch.device("cpu"), torch.float32, 1)
    assert r["forward_ok"] and r["nproc"] == 1 and r["loader"]["tensors"] > 0
