"""Fixtures for the loading tests: the load benchmark module (its checkpoint writer is reused here)."""

from __future__ import annotations

import pytest
from support import load_bench_module


@pytest.fixture(scope="session")
def load_bench():
    return load_bench_module("load_bench")
