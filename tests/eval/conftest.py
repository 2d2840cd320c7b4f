"""Fixtures of the evaluation tests: the finished tiny training run (the export tests' fixture, shared here) and a
small text-to-SQL data file."""

from __future__ import annotations

from pathlib import Path

import pytest
from export.conftest import tiny_run  # noqa: F401  (pytest finds fixtures by name in this module)
from sql_examples import write_sql_file


@pytest.fixture
def sql_file(tmp_path) -> Path:
    return write_sql_file(tmp_path)
