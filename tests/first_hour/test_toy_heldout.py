"""The toy set's held-out split: explicit, disjoint from training (no question or SQL answer of it is ever trained on,
nor in the tokenizer's corpus), each held-out value trained on only in other templates, and what `shardtune evaluate
--data builtin:toy-sql` scores."""

from __future__ import annotations

import re

import pytest

from shardtune.builtin.toy_sql import (BUILTIN_DATA, BUILTIN_HELDOUT, builtin_corpus, scored_split,
                                       toy_sql_records)
from shardtune.data.pipeline import BadLines, iter_records
from shardtune.errors import DataError

HELDOUT_RECORDS = 146  # quoted in README and docs/cpu.md


def _values(sql: str) -> set[str]:
    """The literals of a toy query: quoted strings and numbers after a comparison."""
    return set(re.findall(r"'([^']*)'", sql)) | set(re.findall(r"[=<>] (\d+)", sql))


def _shape(sql: str) -> str:
    """The query with its literals blanked: the template it came from."""
    return re.sub(r"[=<>] \d+", "= N", re.sub(r"'[^']*'", "'V'", sql))


def test_heldout_is_disjoint_and_counted():
    train, held = toy_sql_records(), toy_sql_records(heldout=True)
    assert len(held) == HELDOUT_RECORDS and len(train) == 1184
    assert not {r["output"] for r in train} & {r["output"] for r in held}  # whole (template, value) pairs held out
    corpus_lines = {line.replace("<|im_end|>", "") for text in builtin_corpus() for line in text.split("\n")}
    assert not corpus_lines & ({r["input"] for r in held} | {r["output"] for r in held})  # nor did the tokenizer
    assert all("CREATE TABLE" in r["instruction"] for r in held)  # evaluate runs the SQL on the shown schema


def test_heldout_values_are_trained_only_in_other_templates():
    train, held = toy_sql_records(), toy_sql_records(heldout=True)
    shapes_by_value: dict[str, set[str]] = {}
    for r in train:
        for v in _values(r["output"]):
            shapes_by_value.setdefault(v, set()).add(_shape(r["output"]))
    for r in held:
        for v in _values(r["output"]):
            assert shapes_by_value.get(v, set()) - {_shape(r["output"])}, (v, r["output"])
    assert {_shape(r["output"]) for r in held} <= {_shape(r["output"]) for r in train}  # every structure is taught


def test_heldout_is_read_by_name_and_is_what_evaluate_scores():
    held = toy_sql_records(heldout=True)
    read = [r for _, r in iter_records(BUILTIN_HELDOUT, "--data", BadLines("error", "--data"))]
    assert read == held
    assert len(list(iter_records(BUILTIN_DATA, "data.path", BadLines("error", "data.path")))) == 1184
    assert scored_split(BUILTIN_DATA) == BUILTIN_HELDOUT and scored_split("my.jsonl") == "my.jsonl"
    with pytest.raises(DataError, match="builtin:toy-sql-heldout"):
        list(iter_records("builtin:nope", "data.path", BadLines("error", "data.path")))
