"""The README's main command, as a user runs it: `shardtune train` with no config, then `shardtune generate` on
held-out toy questions and `shardtune evaluate --data builtin:toy-sql`, which scores the 146 held-out records
(execution accuracy >= 0.5 after the quickstart, issue 14)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest


def _cmd(*args: str) -> list[str]:
    exe = shutil.which("shardtune")
    return [exe, *args] if exe else [sys.executable, "-m", "shardtune.cli", *args]


@pytest.mark.slow
def test_quickstart_trains_and_generates(tmp_path):
    # a user's shell: nothing a launcher (or an earlier in-process test) sets
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SHARDTUNE_LAUNCHED")}
    train = subprocess.run(_cmd("train"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-2000:]
    assert train.stdout.splitlines()[0] == "config: the quickstart (shardtune/assets/quickstart.yaml)"
    assert train.stderr == "", train.stderr[-2000:]  # quiet: no third-party warnings or import noise
    m = re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", train.stdout)
    assert m, train.stdout[-2000:]
    first, last = float(m.group(1)), float(m.group(2))
    assert last < first - 1.0, f"eval loss did not fall enough: {first} -> {last}"
    run = tmp_path / "runs" / "quickstart"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "shardtune_run.json"):
        assert (run / name).is_file(), name
    # the demo: held-out questions (never trained on, typed without the schema) get different SQL, each with the
    # question's value copied in
    demo = {"What are the names of singers from Chile?": "Chile", "How old is Tom Lee?": "Tom Lee",
            "What is the largest capacity of stadiums in Seoul?": "Seoul",
            "What is the capacity of Blue Dome?": "Blue Dome"}
    gen = subprocess.run(_cmd("generate", "--adapter", str(run), *demo), cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    answers = [a.strip() for a in re.split(r"^--- \[\d+\] .*$", gen.stdout, flags=re.M)[1:]]
    assert len(answers) == len(demo) and len(set(answers)) == len(demo), gen.stdout
    assert all(a.startswith("SELECT ") for a in answers), gen.stdout
    assert sum(f"'{value}'" in a for value, a in zip(demo.values(), answers)) >= 3, gen.stdout
    ev = subprocess.run(_cmd("evaluate", "--adapter", str(run), "--data", "builtin:toy-sql"),
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    # `--data builtin:toy-sql` scores the held-out split: 146 records never trained on
    assert "evaluated 146 records of builtin:toy-sql-heldout" in ev.stdout, ev.stdout
    m = re.search(r"execution accuracy: ([0-9.]+) over (\d+) records", ev.stdout)
    assert m and int(m.group(2)) >= 120, ev.stdout
    assert float(m.group(1)) >= 0.5, ev.stdout
