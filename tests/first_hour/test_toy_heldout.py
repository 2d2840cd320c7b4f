"""The toy set's held-out split: explicit, disjoint from training (no SQL answer of it is ever trained on), and read
by name through the data module, so `shardtune evaluate --data builtin:toy-sql-heldout` scores unseen pairs."""

from __future__ import annotations

import pytest

from shardtune.builtin.toy_sql import BUILTIN_DATA, BUILTIN_HELDOUT, builtin_corpus, toy_sql_records
from shardtune.data.pipeline import BadLines, iter_records
from shardtune.errors import DataError


def test_heldout_is_disjoint_and_named():
    train, held = toy_sql_records(), toy_sql_records(heldout=True)
    assert len(held) >= 100 and len(train) > 5 * len(held)
    assert not {r["output"] for r in train} & {r["output"] for r in held}  # whole (template, value) pairs held out
    assert not set(builtin_corpus()) & {r["input"] for r in held}
    assert all("CREATE TABLE" in r["instruction"] for r in held)  # evaluate runs the SQL on the shown schema
    read = [r for _, r in iter_records(BUILTIN_HELDOUT, "--data", BadLines("error", "--data"))]
    assert read == held
    assert len(list(iter_records(BUILTIN_DATA, "data.path", BadLines("error", "data.path")))) == len(train)
    with pytest.raises(DataError, match="builtin:toy-sql-heldout"):
        list(iter_records("builtin:nope", "data.path", BadLines("error", "data.path")))
