"""MetricsLog: metrics.jsonl always, TensorBoard by default, wandb / mlflow offline when installed, one coherent
history across a resume, and the list of where everything went."""

from __future__ import annotations

import json

import pytest

from shardtune.train.metrics import MetricsLog


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_and_tensorboard_and_locations(tmp_path):
    log = MetricsLog(tmp_path, True, ["tensorboard"])
    log.log(5, loss=2.0)
    log.close()
    where = log.locations()
    assert set(where) == {"metrics", "tensorboard", "plot"}
    assert _rows(where["metrics"])[0]["loss"] == 2.0
    assert any(where["tensorboard"].iterdir())
    assert MetricsLog(tmp_path / "none", True, []).locations(plot=False) == {"metrics": tmp_path / "none" / "metrics.jsonl"}


def test_a_resumed_run_continues_one_history(tmp_path):
    first = MetricsLog(tmp_path, True, [])
    for step in (10, 20, 30):  # checkpoint at 20; the run died after logging 30
        first.log(step, loss=1.0 / step)
    first.close()
    resumed = MetricsLog(tmp_path, True, [], start_step=20)
    assert [r["step"] for r in resumed.rows] == [10, 20]  # the plot covers the whole run
    resumed.log(30, loss=0.5)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "metrics.jsonl")] == [(10, 0.1), (20, 0.05), (30, 0.5)]
    fresh = MetricsLog(tmp_path, True, [])  # a new run (start_step 0) does not append to another run's history
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_missing_backend_is_one_warning_not_a_crash(tmp_path, capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    log = MetricsLog(tmp_path, True, ["wandb"])
    log.log(1, loss=1.0)
    log.close()
    assert "shardtune[wandb]" in capsys.readouterr().err
    assert set(log.locations(plot=False)) == {"metrics"}


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLog(tmp_path, True, ["wandb"], run_config={"train": {"lr": 1e-3}})
    log.log(1, loss=1.0)
    log.close()
    assert log.locations()["wandb"].is_dir() and (tmp_path / "wandb_run_id.txt").is_file()


def test_mlflow_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log = MetricsLog(tmp_path, True, ["mlflow"], run_config={"train": {"lr": 1e-3}})
    log.log(1, loss=1.0)
    log.close()
    assert log.locations()["mlflow"].is_dir() and (tmp_path / "mlflow_run_id.txt").is_file()
