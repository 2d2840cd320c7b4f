"""Small helpers shared by tests (importable as `support`; tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

# A small, learnable alpaca-format set: the answer is a deterministic function of the question.
TABLES = ["singer", "concert", "stadium", "album", "player", "team"]
COLUMNS = ["age", "year", "capacity", "price", "score", "rank"]


def alpaca_records(n: int = 96) -> list[dict]:
    recs = []
    for i in range(n):
        t, c = TABLES[i % len(TABLES)], COLUMNS[(i // len(TABLES)) % len(COLUMNS)]
        v = 10 + (i * 7) % 50
        recs.append({"instruction": f"How many rows of {t} have {c} above {v}?",
                     "input": f"table {t}({c}, name)",
                     "output": f"SELECT count(*) FROM {t} WHERE {c} > {v}"})
    return recs


def corpus() -> list[str]:
    return [f"{r['instruction']} {r['input']} {r['output']}" for r in alpaca_records()] * 2


def run_overrides(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    """Overrides for a fast CPU run on a tiny model."""
    base = {"model.name_or_path": model_dir, "data.path": data, "output.dir": out, "data.max_seq_len": 96,
            "train.max_steps": 12, "train.micro_batch_size": 8, "train.lr": 3e-3, "train.warmup_steps": 2,
            "train.log_every": 4, "train.eval_every": 0, "output.tensorboard": False, "output.plot": False,
            "lora.rank": 8, "lora.alpha": 16}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward in one forward of `model` (distinct storages, parameters excluded)."""
    import torch
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


def load_bench_module(name: str):
    """bench/<name>.py imported by path (bench/ is scripts, not a package the tests install)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
