"""shardtune split: whole databases go to one side, the choice is seeded, records are kept unchanged."""

from __future__ import annotations

import json

import pytest

from shardtune.data.split import record_db_id, split_by_database
from shardtune.errors import ConfigError, DataError


def _records():
    recs = [{"db_id": f"db{i % 10}", "question": f"q{i}", "query": f"SELECT {i}"} for i in range(50)]
    # DB-GPT-Hub's Spider export names the database only in its instruction
    recs.append({"instruction": "concert_singer contains tables such as stadium, singer.", "input": "How many?",
                 "output": "select count(*) from singer"})
    return recs


def test_split_by_database_is_disjoint_seeded_and_complete(tmp_path):
    src = tmp_path / "dev.json"
    src.write_text(json.dumps(_records()))
    info = split_by_database(src, tmp_path / "a", 0.2, seed=3)
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    held = json.loads((tmp_path / "a" / "heldout.json").read_text())
    assert len(info["heldout_databases"]) == 2 and len(info["train_databases"]) == 9  # round(11 * 0.2) = 2
    assert {record_db_id(r) for r in held} == set(info["heldout_databases"])
    assert not {record_db_id(r) for r in train} & set(info["heldout_databases"])
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, _records()))  # nothing lost or changed
    assert json.loads((tmp_path / "a" / "split.json").read_text())["seed"] == 3
    again = split_by_database(src, tmp_path / "b", 0.2, seed=3)
    other = split_by_database(src, tmp_path / "c", 0.2, seed=4)
    assert again["heldout_databases"] == info["heldout_databases"]
    assert other["heldout_databases"] != info["heldout_databases"]


def test_split_errors(tmp_path):
    src = tmp_path / "dev.json"
    src.write_text(json.dumps([{"question": "q", "query": "SELECT 1"}]))
    with pytest.raises(DataError, match="record 0 has no db_id"):
        split_by_database(src, tmp_path / "o")
    src.write_text(json.dumps([{"db_id": "only", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(DataError, match="needs at least 2"):
        split_by_database(src, tmp_path / "o")
    with pytest.raises(ConfigError, match="--heldout 1.5"):
        split_by_database(src, tmp_path / "o", 1.5)
