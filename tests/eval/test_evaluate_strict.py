"""evaluate refuses what it cannot do honestly: a --db-dir that does not hold every record's database is an error,
empty / unparsable / refused predictions are counted as errors, hostile SQL from the model or the data touches no
file, and the worst failures are listed."""

from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path

import pytest

from shardtune.errors import ConfigError, DataError
from shardtune.eval.evaluate import evaluate
from shardtune.eval.report import format_summary, format_worst, worst_failures
from shardtune.eval.text2sql.synth import build_database, schema_from_spider

from sql_examples import GOLD, RECORDS, SCHEMA_ENTRY, oracle


@pytest.fixture
def db_dir(tmp_path) -> Path:
    d = tmp_path / "dbs"
    build_database(schema_from_spider(SCHEMA_ENTRY), d / "music" / "music.sqlite", literals=GOLD)
    return d


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- --db-dir


def test_db_dir_that_is_not_there_is_an_error_before_any_model_loads(sql_file, tmp_path):
    nowhere = tmp_path / "nowhere"
    # the run directory does not exist either: the --db-dir check comes first, before the adapter is even read
    with pytest.raises(DataError, match=r"--db-dir '.*nowhere' is not a directory; pass the folder that holds "
                                        r"<db_id>/<db_id>.sqlite .* or leave --db-dir out"):
        evaluate(tmp_path / "no-run", sql_file, db_dir=nowhere)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"--db-dir '.*empty' holds no <db_id>/<db_id>.sqlite databases"):
        evaluate(tmp_path / "no-run", sql_file, db_dir=tmp_path / "empty")


def test_db_dir_lacking_a_needed_database_names_it(sql_file, db_dir, tmp_path):
    other = tmp_path / "other"
    build_database(schema_from_spider(SCHEMA_ENTRY), other / "concerts" / "concerts.sqlite")
    msg = r"--db-dir '.*other' has no database for db_id 'music' \(looked for .*music/music.sqlite; 1 db_ids missing"
    with pytest.raises(DataError, match=msg):
        evaluate(None, sql_file, predict_fn=oracle, db_dir=other)
    # a db_id that is a path never reaches the file system
    p = tmp_path / "escape.jsonl"
    p.write_text(json.dumps({**RECORDS[0], "db_id": "../music"}) + "\n")
    with pytest.raises(DataError, match=r"no database for db_id '../music' \(not a plain name"):
        evaluate(None, p, predict_fn=oracle, db_dir=db_dir)
    # a record without a db_id cannot be served by --db-dir
    p = tmp_path / "no_id.jsonl"
    p.write_text(json.dumps({k: v for k, v in RECORDS[0].items() if k != "db_id"}) + "\n")
    with pytest.raises(DataError, match=r"no_id.jsonl:1: record has no db_id, so --db-dir"):
        evaluate(None, p, predict_fn=oracle, db_dir=db_dir)


def test_db_dir_with_non_sql_data_is_an_error(tmp_path, db_dir):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    with pytest.raises(ConfigError, match="--db-dir is for text-to-SQL data"):
        evaluate(None, p, predict_fn=oracle, db_dir=db_dir)


def test_cli_prints_the_db_dir_error_as_one_line(tiny_run, sql_file, tmp_path, capsys):
    from shardtune.cli import main

    rc = main(["evaluate", "--adapter", str(tiny_run.run_dir), "--data", str(sql_file),
               "--db-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: --db-dir") and "nowhere" in err


# ---------------------------------------------------------------- prediction errors


def test_empty_and_unparsable_predictions_are_errors(db_dir, tmp_path):
    recs = [{**RECORDS[0], "output": "SELECT name FROM singer WHERE age > 1000"},  # an empty result on the real db
            RECORDS[0], RECORDS[1], RECORDS[2]]
    p = tmp_path / "dev.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    preds = ["", "```sql\nSELEC name FROM singer\n```", "SELECT count(*) FROM singer WHERE country = 'France'",
             "   "]
    res = evaluate(None, p, predict_fn=lambda r: preds, db_dir=db_dir, out=tmp_path / "r.json")
    s = res["summary"]
    # before: an empty prediction ran as an empty statement and "matched" the gold query's empty result
    assert [r["status"] for r in res["records"]] == ["empty", "unparsable", "correct", "empty"]
    assert [r["exec"] for r in res["records"]] == [False, False, True, False]
    assert s["prediction_errors"] == 3
    assert s["prediction_error_kinds"] == {"empty": 2, "unparsable": 1, "refused": 0, "timeout": 0,
                                           "too_large": 0, "error": 0}
    assert s["execution_accuracy"] == 0.25 and s["databases"] == {"real": 4}
    assert "prediction errors: 3 (2 empty, 1 unparsable)" in format_summary(s)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["prediction_errors"] == 3 and len(saved["records"]) == 4


def test_unscored_records_still_count_prediction_errors(tmp_path):
    p = tmp_path / "noschema.jsonl"  # no tables.json, no CREATE TABLE: nowhere to run the SQL
    p.write_text("".join(json.dumps({"instruction": "q", "input": "", "output": g}) + "\n" for g in GOLD[:3]))
    res = evaluate(None, p, predict_fn=lambda r: ["", "SELECT FROM WHERE", GOLD[2]], out=tmp_path / "o.json")
    s = res["summary"]
    assert s["execution_scored"] == 0 and s["execution_unscored"]["no_database"] == 3
    assert [r["status"] for r in res["records"]] == ["empty", "unparsable", "unscored"]
    assert s["prediction_errors"] == 2


# ---------------------------------------------------------------- hostile SQL through evaluate


def test_hostile_predictions_and_gold_touch_no_file(sql_file, db_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path
    hostile = [f"ATTACH DATABASE '{d}/x.db' AS x", f"VACUUM INTO '{d}/y.db'", "DROP TABLE singer"]
    before = _files(tmp_path)
    res = evaluate(None, sql_file, predict_fn=lambda r: hostile, db_dir=db_dir, out=tmp_path / "h.json")
    assert [r["status"] for r in res["records"]] == ["refused", "refused", "refused"]
    assert all(r["exec_note"].startswith("prediction failed: refused: ") for r in res["records"])
    assert res["summary"]["prediction_error_kinds"]["refused"] == 3
    after = _files(tmp_path)
    assert after.pop("h.json") and after == before  # only the results file is new; the database is byte-identical

    # a gold query from the data is sandboxed too: it fails (record not scored), nothing is written
    bad = tmp_path / "bad_gold.jsonl"
    bad.write_text(json.dumps({**RECORDS[0], "output": "WITH x AS (SELECT 1) DELETE FROM singer"}) + "\n"
                   + "".join(json.dumps(r) + "\n" for r in RECORDS[1:]))
    before = _files(tmp_path)
    res = evaluate(None, bad, predict_fn=oracle, db_dir=db_dir, out=tmp_path / "g.json", metric="sql")
    first = res["records"][0]
    assert first["exec"] is None and first["exec_note"].startswith("gold query failed: refused: DELETE")
    assert res["summary"]["execution_unscored"]["gold_failed"] == 1
    after = _files(tmp_path)
    assert after.pop("g.json") and after == before


# ---------------------------------------------------------------- worst failures


def test_worst_failures_table(db_dir, sql_file, tmp_path):
    preds = ["SELECT name FROM singer WHERE age < 30", "", "SELECT nme FROM singer"]
    res = evaluate(None, sql_file, predict_fn=lambda r: preds, db_dir=db_dir, out=tmp_path / "w.json")
    rows = res["records"]
    assert [r["status"] for r in rows] == ["wrong_result", "empty", "error"]
    assert [r["status"] for r in worst_failures(rows)] == ["empty", "error", "wrong_result"]
    table = format_worst(rows, out=str(tmp_path / "w.json"))
    lines = table.splitlines()
    assert lines[0] == f"worst 3 of 3 failures (every record: {tmp_path / 'w.json'})"
    assert lines[1].split() == ["where", "status", "question", "gold", "predicted"]
    assert "(empty)" in lines[2] and "How many French?" in lines[2] and "dev.jsonl:2" in lines[2]
    assert "SELECT nme FROM singer" in lines[3] and "Singers over 30?" in lines[4]
    assert all(len(x) <= 140 for x in lines)
    assert len(worst_failures(rows * 3, n=5)) == 5
    assert format_worst([dict(r, status="correct") for r in rows]) == ""  # nothing failed: no table


def test_cli_evaluate_picks_cpu_threads_by_the_rule(tiny_run, sql_file, tmp_path, capsys, monkeypatch):
    import torch

    from shardtune import threads
    from shardtune.cli import main

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SHARDTUNE_THREADS", raising=False)
    # 3 usable cores, 1 kept busy by others: the rule gives 2 (fixed here, so the machine's load cannot change it)
    monkeypatch.setattr(threads, "usable_cores", lambda: 3)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    chosen = 2
    try:
        torch.set_num_threads(1)  # something else, so the test sees evaluate set it
        rc = main(["evaluate", "--adapter", str(tiny_run.run_dir), "--data", str(sql_file), "--limit", "1",
                   "--max-new-tokens", "2", "--device", "cpu", "--out", str(tmp_path / "t.json")])
        assert rc == 0, capsys.readouterr().err
        assert torch.get_num_threads() == chosen and os.environ["SHARDTUNE_THREADS"] == str(chosen)
    finally:
        torch.set_num_threads(before)
