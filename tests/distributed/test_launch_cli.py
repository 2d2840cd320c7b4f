"""`shardtune train --nproc 2` starts its two ranks itself (parallel/supervise.py) and the run completes (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import run_overrides

pytestmark = pytest.mark.slow


def test_nproc_starts_two_ranks_and_finishes(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    ov = run_overrides(tiny_model("llama"), alpaca_file, out, **{"train.max_steps": 2, "train.micro_batch_size": 2,
                                                                 "parallel.strategy": "ddp", "train.method": "lora"})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # no --master-port: the default single-node path (a free port)
    proc = subprocess.run([sys.executable, "-m", "shardtune.cli", "train", "--nproc", "2", *ov], env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "ddp x2" in proc.stdout, log
    assert "rank 1: parameters" in proc.stdout, log  # the balance report saw both ranks
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
