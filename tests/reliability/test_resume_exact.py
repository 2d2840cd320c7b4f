"""Bit-exact resume on one process: a run stopped by SIGTERM (or killed with SIGKILL) and resumed produces exactly
the losses and the adapter of the uninterrupted run: the checkpoint holds weights, optimizer, schedule and every RNG
(LoRA dropout is on, so a lost RNG state would show)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardtune.config import load_config
from shardtune.errors import Stopped
from shardtune.train.loop import Trainer, train
from support import run_overrides

QUIET = dict(out=lambda *_: None)
EXTRA = {"train.method": "lora", "lora.dropout": 0.1, "train.max_steps": 8, "train.log_every": 1,
         "train.micro_batch_size": 4}


def _cfg(tiny_model, data, out, **kw):
    return load_config(None, run_overrides(tiny_model("llama"), data, out, **dict(EXTRA, **kw)))


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _signal_at(trainer: Trainer, step: int, signum=signal.SIGTERM):
    """Deliver `signum` to this process while the optimizer step `step` (1-based) runs, as a scheduler would."""
    engine = trainer.engine
    real, calls = engine.step, []

    def step_and_maybe_signal(*a, **kw):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(*a, **kw)
    engine.step = step_and_maybe_signal


@pytest.mark.parametrize("seed, at", [(1, 1), (2, 2), (3, 4), (4, 5), (5, 6)])
def test_sigterm_then_resume_equals_the_uninterrupted_run(tiny_model, alpaca_file, tmp_path, seed, at):
    full = train(_cfg(tiny_model, alpaca_file, tmp_path / "full", **{"train.seed": seed}), **QUIET)

    tr = Trainer(_cfg(tiny_model, alpaca_file, tmp_path / "cut", **{"train.seed": seed}), **QUIET)
    tr.setup()
    _signal_at(tr, at, signal.SIGTERM if seed % 2 else signal.SIGUSR1)
    with pytest.raises(Stopped, match=rf"stopped by SIG(TERM|USR1) at step {at + 1}; checkpoint .*step-0+{at + 1}; "
                                      r"resume with train.resume=true"):
        tr.run()
    assert not (tmp_path / "cut" / "adapter").exists()  # a stopped run has no final adapter, only its checkpoint

    resumed = train(_cfg(tiny_model, alpaca_file, tmp_path / "cut", **{"train.seed": seed, "train.resume": True}),
                    **QUIET)
    assert resumed.losses == full.losses[at + 1:]  # exact, not approximately
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(args: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "shardtune.cli", "train", *args], env=env, text=True, **popen)


def _metric_losses(out: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped_nonfinite")}


@pytest.mark.parametrize("seed, kill_after, save_every", [(1, 5, 2), (2, 13, 7), (3, 9, 4), (4, 21, 5), (5, 30, 8)])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_model, alpaca_file, tmp_path, seed, kill_after,
                                                         save_every):
    # long enough that the kill lands mid-run (a step of the tiny model takes milliseconds)
    common = run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "x",
                           **{**EXTRA, "train.max_steps": 80, "train.seed": seed})
    args = lambda out, *more: [a for a in common if not a.startswith("output.dir=")] + [f"output.dir={out}", *more]
    ref = _cli(args(tmp_path / "full"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # alongside
    run = _cli(args(tmp_path / "cut", f"train.save_every={save_every}"), stdout=subprocess.PIPE,
               stderr=subprocess.STDOUT)
    for line in run.stdout:
        if line.startswith(f"step {kill_after}/"):
            run.send_signal(signal.SIGKILL)  # no handler, no checkpoint: what a node failure or the OOM killer does
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter").exists()
    assert ref.wait(timeout=300) == 0

    resumed = _cli(args(tmp_path / "cut", f"train.save_every={save_every}", "train.resume=true"),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert "resume: continuing from" in text
    assert _metric_losses(tmp_path / "cut") == _metric_losses(tmp_path / "full")
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_command_exits_75_with_one_line_and_a_checkpoint(tiny_model, alpaca_file, tmp_path):
    args = run_overrides(tiny_model("llama"), alpaca_file, tmp_path / "run", **dict(EXTRA, **{"train.max_steps": 400}))
    run = _cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in run.stdout:
        if line.startswith("step 2/"):
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=120)
    assert run.returncode == 75, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM at step "), err
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file()
