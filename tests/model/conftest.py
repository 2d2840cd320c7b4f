"""Fixtures for the loading tests: the load benchmark module (its checkpoint writer is reused here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def load_bench():
    spec = importlib.util.spec_from_file_location("load_bench", REPO / "bench" / "load_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
