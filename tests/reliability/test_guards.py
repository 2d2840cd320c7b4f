"""What protects a run: a diverging run writes no adapter, a finished run is never overwritten, damaged or pickled
checkpoints are skipped without being loaded, a resume with a changed LoRA shape names the change."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from shardtune.cli import main
from shardtune.config import load_config
from shardtune.errors import ConfigError, Diverged
from shardtune.parallel.safe_load import UnsafeCheckpoint, safe_torch_load
from shardtune.train import checkpoint as ckpt
from shardtune.train.loop import train
from support import run_overrides

QUIET = dict(out=lambda *_: None)
FAST = {"train.method": "lora", "train.max_steps": 6, "train.log_every": 1, "train.micro_batch_size": 4}


def _args(tiny_model, data, out, **kw):
    return run_overrides(tiny_model("llama"), data, out, **dict(FAST, **kw))


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes' hash and mtime: 'nothing changed on disk' means this is equal."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_diverging_run_skips_nonfinite_steps_stops_and_writes_no_adapter(tiny_model, alpaca_file, tmp_path, capsys,
                                                                           monkeypatch):
    """From step 3 on every loss is NaN (what a diverged run produces): those updates are skipped and logged, the
    second in a row stops the run with exit 3 and one line, and no adapter is written."""
    from shardtune.train.loop import Trainer
    real, calls = Trainer.loss_sum, []

    def diverging(self, batch):
        calls.append(1)
        loss = real(self, batch)
        return loss * float("nan") if len(calls) > 2 else loss
    monkeypatch.setattr(Trainer, "loss_sum", diverging)
    out = tmp_path / "run"
    rc = main(["train", *_args(tiny_model, alpaca_file, out, **{"train.max_steps": 30, "train.max_bad_steps": 2,
                                                                 "train.save_every": 1})])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3, err
    assert len(err) == 1 and "training diverged" in err[0] and "step 4" in err[0] and "lower train.lr" in err[0] \
        and "step-000002" in err[0], err
    assert not (out / "adapter").exists()
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000001", "step-000002"]  # the good ones
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped_nonfinite")] == [3, 4]


def test_skipped_steps_do_not_change_the_weights(tiny_model, alpaca_file, tmp_path):
    """A step with a non-finite loss leaves weights and optimizer state untouched (the update is skipped)."""
    from shardtune.train.loop import Trainer
    tr = Trainer(load_config(None, _args(tiny_model, alpaca_file, tmp_path / "r", **{"train.max_steps": 3})), **QUIET)
    tr.setup()
    real = tr.loss_sum
    calls = []

    def poisoned(batch):
        calls.append(1)
        loss = real(batch)
        return loss * float("nan") if len(calls) == 2 else loss  # the second step's loss is NaN
    tr.loss_sum = poisoned
    before = {}
    real_step = tr.engine.step

    def step(finite_loss=True):
        if not finite_loss:
            before.update({n: p.detach().clone() for n, p in tr.engine.named_trainable()})
        norm, applied = real_step(finite_loss)
        if not finite_loss:
            assert not applied
            for n, p in tr.engine.named_trainable():
                assert torch.equal(before[n], p.detach()), n
        return norm, applied
    tr.engine.step = step
    res = tr.run()
    assert res.skipped_steps == 1 and len(res.losses) == 2 and before
    assert (tmp_path / "r" / "adapter").is_dir()


def test_a_second_run_into_a_finished_dir_changes_nothing(tiny_model, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_args(tiny_model, alpaca_file, out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *_args(tiny_model, alpaca_file, out, **{"lora.rank": 4})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0] and "train.resume=true" in err[0] \
        and "output.overwrite=true" in err[0], err
    assert snapshot(out) == before
    # resuming a finished run with the same config rewrites nothing either
    assert main(["train", *_args(tiny_model, alpaca_file, out, **{"train.resume": True})]) == 0
    assert snapshot(out) == before


def test_overwrite_starts_over_with_one_run_worth_of_metrics(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *_args(tiny_model, alpaca_file, out)]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mlruns" / "0").mkdir(parents=True)  # an earlier run's mlflow store and wandb id belong to that run
    (out / "wandb_run_id.txt").write_text("old")
    assert main(["train", *_args(tiny_model, alpaca_file, out, **{"output.overwrite": True,
                                                                   "train.max_steps": 4})]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "notes.txt").read_text() == "mine"  # only shardtune's own outputs are deleted
    assert not (out / "mlruns").exists() and not (out / "wandb_run_id.txt").exists()


def test_resume_with_a_changed_lora_rank_names_it(tiny_model, alpaca_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *_args(tiny_model, alpaca_file, out, **{"train.save_every": 2})]) == 0
    before = snapshot(out)
    capsys.readouterr()
    rc = main(["train", *_args(tiny_model, alpaca_file, out, **{"train.save_every": 2, "train.resume": True,
                                                                 "lora.rank": 4, "train.lr": 1e-4,
                                                                 "train.max_steps": 10})])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "lora.rank: 8 -> 4" in err[0] and "train.lr: 0.003 -> 0.0001" in err[0], err
    assert snapshot(out) == before


def _run_with_checkpoints(tiny_model, alpaca_file, out):
    train(load_config(None, _args(tiny_model, alpaca_file, out, **{"train.save_every": 2})), **QUIET)
    return ckpt.complete_checkpoints(out)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tiny_model, alpaca_file, tmp_path, damage):
    out = tmp_path / "run"
    older, newest = _run_with_checkpoints(tiny_model, alpaca_file, out)
    victim = newest / "state-rank00000.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "flip":
        b = bytearray(victim.read_bytes())
        b[-5] ^= 0xFF
        victim.write_bytes(bytes(b))
    else:
        victim.unlink()
    lines = []
    res = train(load_config(None, _args(tiny_model, alpaca_file, out, **{"train.save_every": 2, "train.resume": True,
                                                                          "train.max_steps": 8})), out=lines.append)
    assert any(ln.startswith(f"resume: skipping {newest}") for ln in lines), lines
    assert any(f"continuing from {older}" in ln for ln in lines), lines
    assert len(res.losses) == 8 - int(older.name.split("-")[1])


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOOM_MARKER']}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "evil": _Boom()}, path)
    with pytest.raises(UnsafeCheckpoint, match="allow-list"):
        safe_torch_load(str(path))
    assert not marker.exists()
    assert safe_torch_load(str(_plain(tmp_path)))["w"].shape == (2,)  # ordinary tensors still load


def _plain(tmp_path):
    p = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, p)
    return p


def test_a_checkpoint_in_the_old_pickle_format_is_never_loaded(tiny_model, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    older, newest = _run_with_checkpoints(tiny_model, alpaca_file, out)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    legacy = out / "checkpoints" / "step-000099"
    legacy.mkdir()
    torch.save({"client": {"step": 99}, "x": _Boom()}, legacy / "engine.pt")
    (legacy / ckpt.COMPLETE).write_text("99")
    lines = []
    train(load_config(None, _args(tiny_model, alpaca_file, out, **{"train.save_every": 2, "train.resume": True,
                                                                   "train.max_steps": 8})), out=lines.append)
    assert any("step-000099" in ln and "pickle format" in ln for ln in lines), lines
    assert not marker.exists()


def test_output_dir_that_cannot_be_created_is_one_line(tiny_model, alpaca_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", *_args(tiny_model, alpaca_file, blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output.dir" in err[0], err




def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_model, alpaca_file, tmp_path,
                                                                                capsys, monkeypatch):
    import errno

    from shardtune.parallel import state
    real, calls = state.save_training_state, []

    def fill_the_disk(engine, d):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint (step 4)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(engine, d)
    monkeypatch.setattr(state, "save_training_state", fill_the_disk)
    out = tmp_path / "run"
    rc = main(["train", *_args(tiny_model, alpaca_file, out, **{"train.save_every": 2})])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and "step-000002" in err[0] and "train.resume=true" in err[0], err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert ckpt.checkpoint_problem(out / "checkpoints" / "step-000002") is None
    assert not (out / "adapter").exists()


def test_a_second_signal_aborts_at_once(monkeypatch, capsys):
    import signal

    from shardtune.train.preempt import StopRequests
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    stops = StopRequests()
    stops._handle(signal.SIGTERM, None)
    assert stops.signum == signal.SIGTERM and not exits  # the first asks for a checkpoint
    stops._handle(signal.SIGUSR1, None)
    assert exits == [128 + signal.SIGUSR1]  # the second does not wait for one
    assert "aborting now" in capsys.readouterr().err
