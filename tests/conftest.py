"""Shared fixtures: tiny real-architecture models and small data files, built locally (nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

from support import alpaca_records, corpus  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("SHARDTUNE_CACHE", str(tmp_path_factory.mktemp("shardtune-cache")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> path of a tiny HF model directory of that architecture (built once per session)."""
    from shardtune.builtin.tiny_model import build_tiny_model_dir
    made: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = build_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), corpus(), arch=arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records()))
    return p
