"""Multi-node, exercised for real on one machine: two `shardtune train --nnodes 2 --node-rank R` supervisors act as
two nodes (one rank each, gloo on CPU, static rendezvous on 127.0.0.1). Losses equal the one-process run (FSDP2 and
DeepSpeed ZeRO-3), a preemption signal to one node checkpoints both, and a killed node stops the other with one line.
Tolerance as in test_sharded_training.py: only the order of floating-point additions differs (2e-4 relative)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import run_overrides

pytestmark = pytest.mark.slow

RTOL = 2e-4
COMMON = {"train.method": "lora", "lora.dropout": 0.0, "train.grad_clip": 0.3, "train.log_every": 1,
          "train.eval_every": 0, "train.warmup_steps": 2, "train.schedule": "linear", "data.max_seq_len": 64,
          "train.max_steps": 5, "train.micro_batch_size": 4}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(args: list[str], port: int) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    return [subprocess.Popen([sys.executable, "-m", "shardtune.cli", "train", "--nproc", "1", "--nnodes", "2",
                              "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_model, alpaca_file, tmp_path_factory):
    """The one-process run with the same global batch (2 nodes x micro batch 4 = 8)."""
    import torch

    from shardtune.config import load_config
    from shardtune.train.loop import train
    out = tmp_path_factory.mktemp("mn") / "ref"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, run_overrides(tiny_model("llama"), alpaca_file, out,
                                              **{**COMMON, "train.micro_batch_size": 8})), out=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return _losses(out)


@pytest.mark.parametrize("engine", [{"parallel.strategy": "fsdp"},
                                    {"parallel.strategy": "deepspeed", "parallel.zero_stage": 3}], ids=["fsdp", "ds3"])
def test_two_nodes_follow_the_one_process_trajectory(engine, reference, tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "run"
    nodes = _nodes(run_overrides(tiny_model("llama"), alpaca_file, out, **{**COMMON, **engine}), _port())
    logs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    assert "x2" in logs[0][0]  # one world of two ranks, not two runs of one
    assert _losses(out) == pytest.approx(reference, rel=RTOL)


def _wait_for_step(node: subprocess.Popen, step: int) -> None:
    for line in node.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"node 0 ended before step {step}: {node.stderr.read()}")


def test_a_signal_to_one_node_checkpoints_both(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "run"
    nodes = _nodes(run_overrides(tiny_model("llama"), alpaca_file, out,
                                 **{**COMMON, "parallel.strategy": "fsdp", "train.max_steps": 200}), _port())
    _wait_for_step(nodes[0], 2)
    nodes[1].send_signal(signal.SIGTERM)  # only node 1's supervisor is told, as when one node is preempted
    errs = [p.communicate(timeout=120)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [75, 75], errs
    line = [ln for ln in errs[0].splitlines() if ln.strip()]
    assert len(line) == 1 and line[0].startswith("stopped by SIGTERM at step "), errs
    step = int(line[0].split("at step ")[1].split(";")[0])
    d = out / "checkpoints" / f"step-{step:06d}"
    assert (d / "COMPLETE").is_file()
    assert {p.name for p in d.glob("state-rank*.safetensors")} == {"state-rank00000.safetensors",
                                                                   "state-rank00001.safetensors"}


def test_a_killed_node_stops_the_other_with_one_line(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "run"
    nodes = _nodes(run_overrides(tiny_model("llama"), alpaca_file, out,
                                 **{**COMMON, "parallel.strategy": "fsdp", "train.max_steps": 500}), _port())
    _wait_for_step(nodes[0], 2)
    t0 = time.monotonic()
    nodes[1].kill()  # the node is gone: its supervisor and (through PDEATHSIG) its rank
    err = nodes[0].communicate(timeout=120)[1]
    assert time.monotonic() - t0 < 60
    assert nodes[0].returncode == 4, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= 2 and "rank 0: lost contact with another rank during step" in lines[0], err
    assert "Traceback" not in err
