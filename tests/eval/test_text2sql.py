"""SQL normalization, execution comparison, and databases synthesized from schemas."""

from __future__ import annotations

import json
import sqlite3

import pytest

from shardtune.eval.text2sql.execute import execution_match, is_trivial, results_match, synthetic_execution_match
from shardtune.eval.text2sql.normalize import exact_match, extract_sql, has_top_level_order_by
from shardtune.eval.text2sql.sandbox import SqlExecutionError, execute_readonly
from shardtune.eval.text2sql.synth import (DatabaseProvider, build_database, load_spider_tables,
                                           schema_from_create_statements, schema_from_spider)

from sql_examples import GOLD, SCHEMA_ENTRY, SHARED_DATA


@pytest.fixture(scope="module")
def music_db(tmp_path_factory):
    schema = schema_from_spider(SCHEMA_ENTRY)
    return build_database(schema, tmp_path_factory.mktemp("db") / "music.sqlite", literals=GOLD)


def _rows(db, sql):
    return sqlite3.connect(db).execute(sql).fetchall()


# ---------------------------------------------------------------- normalization


@pytest.mark.parametrize("a,b", [
    ("SELECT name FROM singer;", "select  name\nfrom SINGER"),
    ("SELECT count(*) FROM t WHERE c = \"France\"", "select count ( * ) from t where c='france' ;"),
    ("SELECT a FROM t WHERE b <> 1", "SELECT a FROM t WHERE b != 1"),
    ("SELECT `a` FROM [t]", "SELECT a FROM t"),
    ("SELECT a FROM t WHERE s = 'it''s'", "SELECT a FROM t WHERE s = \"it's\""),
])
def test_normalization_ignores_case_space_quotes_semicolon(a, b):
    assert exact_match(a, b)


@pytest.mark.parametrize("a,b", [
    ("SELECT name FROM singer WHERE age > 30", "SELECT name FROM singer WHERE age >= 30"),
    ("SELECT a FROM t WHERE s = 'x y'", "SELECT a FROM t WHERE s = 'x  y'"),  # literal content is kept
    ("SELECT a, b FROM t", "SELECT b, a FROM t"),
])
def test_normalization_keeps_real_differences(a, b):
    assert not exact_match(a, b)


def test_extract_sql_from_model_output():
    assert extract_sql("```sql\nSELECT a FROM t;\n```\nThis query selects a.") == "SELECT a FROM t"
    assert extract_sql("SELECT a FROM t WHERE s = 'x;y'; SELECT 2") == "SELECT a FROM t WHERE s = 'x;y'"
    assert extract_sql("  SELECT 1  ") == "SELECT 1"


def test_order_by_detection_ignores_subqueries():
    assert has_top_level_order_by("SELECT a FROM t ORDER BY a")
    assert not has_top_level_order_by("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)")


# ---------------------------------------------------------------- execution


def test_differently_written_correct_sql_counts_and_wrong_sql_does_not(music_db):
    gold = "SELECT name FROM singer WHERE age > 30"
    assert _rows(music_db, gold), "the synthesized data must make this WHERE select something"
    same = "select s.name from singer as s where not s.age <= 30"
    assert execution_match(music_db, gold, same).match is True
    assert execution_match(music_db, gold, "SELECT name FROM singer WHERE age < 30").match is False
    assert execution_match(music_db, gold, "SELECT name FROM singer").match is False
    bad = execution_match(music_db, gold, "SELECT nme FROM singer")
    assert bad.match is False and "no such column" in bad.pred_error
    assert execution_match(music_db, "SELECT broken FROM nowhere", gold).match is None  # gold fails: unscored


def test_row_order_matters_only_with_order_by(music_db):
    gold = "SELECT name, age FROM singer ORDER BY age DESC, name"
    rows = _rows(music_db, gold)
    assert len(set(r[1] for r in rows)) > 1
    assert execution_match(music_db, gold, "SELECT name, age FROM singer ORDER BY age ASC, name").match is False
    assert execution_match(music_db, "SELECT name, age FROM singer",
                             "SELECT name, age FROM singer ORDER BY age ASC").match is True
    # the same columns in another order are the same answer
    assert execution_match(music_db, "SELECT name, age FROM singer", "SELECT age, name FROM singer").match is True


def test_group_by_is_discriminative(music_db):
    gold = "SELECT country, count(*) FROM singer GROUP BY country"
    counts = [c for _, c in _rows(music_db, gold)]
    assert len(counts) > 1 and max(counts) > 1  # several groups, some with several rows
    assert execution_match(music_db, gold, "SELECT country, count(*) FROM singer GROUP BY name").match is False
    assert execution_match(music_db, gold,
                             "SELECT country, count(*) FROM singer GROUP BY country HAVING count(*) > 1").match is False


def test_results_match_rules():
    assert results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=False)
    assert not results_match([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert not results_match([(1,), (1,)], [(1,)], ordered=False)  # multisets, not sets
    assert results_match([(2.0,)], [(2,)], ordered=False)
    assert results_match([(0.1 + 0.2,)], [(0.3,)], ordered=False)


def test_runaway_query_times_out(music_db):
    sql = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    with pytest.raises(SqlExecutionError, match="timed out"):
        execute_readonly(music_db, sql, timeout_s=0.2)


# ---------------------------------------------------------------- synthesis


def test_synthesized_database_follows_the_schema(music_db, tmp_path):
    conn = sqlite3.connect(music_db)
    cols = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(concert)")}
    assert cols == {"concert_id": "INTEGER", "singer_id": "INTEGER", "year": "INTEGER", "Ticket Price": "REAL"}
    fks = conn.execute("PRAGMA foreign_key_list(concert)").fetchall()
    assert [(f[2], f[3], f[4]) for f in fks] == [("singer", "singer_id", "singer_id")]
    ids = [r[0] for r in conn.execute("SELECT singer_id FROM singer")]
    assert len(ids) == len(set(ids)) >= 10  # primary key unique, several rows
    refs = [r[0] for r in conn.execute("SELECT singer_id FROM concert")]
    assert refs and set(refs) <= set(ids)  # every reference resolves
    assert conn.execute("SELECT count(*) FROM singer WHERE country = 'France'").fetchone()[0] > 0  # planted literal
    assert conn.execute("SELECT count(*) FROM concert WHERE year = 2014").fetchone()[0] > 0
    # deterministic per seed, different across seeds
    schema = schema_from_spider(SCHEMA_ENTRY)
    a = build_database(schema, tmp_path / "a.sqlite", literals=GOLD)
    b = build_database(schema, tmp_path / "b.sqlite", literals=GOLD, seed=1)
    dump = lambda p: list(sqlite3.connect(p).iterdump())  # noqa: E731
    assert dump(a) == dump(music_db) and dump(b) != dump(a)


def test_schema_from_create_statements():
    text = ("CREATE TABLE state (\nstate_name,\npopulation,\narea\n)\n\nCREATE TABLE city (\ncity_name,\n"
            "state_name,\npopulation\n)\n\n-- Using valid SQLite, answer the question.\nSELECT")
    s = schema_from_create_statements("geo", text)
    assert [tb.name for tb in s.tables] == ["state", "city"]
    assert [(c.name, c.type) for c in s.table("state").columns] == [
        ("state_name", "text"), ("population", "number"), ("area", "number")]
    typed = schema_from_create_statements("x", "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, born DATE);")
    assert [(c.name, c.type) for c in typed.tables[0].columns] == [("id", "number"), ("name", "text"),
                                                                   ("born", "time")]
    assert typed.tables[0].primary_key == ["id"]


@pytest.mark.skipif(not (SHARED_DATA / "text2sql" / "spider_tables.json").is_file(),
                    reason="shared Spider data not present")
def test_real_spider_schema_builds_and_runs_its_gold_queries(tmp_path):
    schemas = load_spider_tables(SHARED_DATA / "text2sql" / "spider_tables.json")
    dev = json.loads((SHARED_DATA / "text2sql" / "spider_dev.json").read_text())
    gold = [r["query"] for r in dev if r["db_id"] == "concert_singer"]
    assert len(gold) > 20
    db = build_database(schemas["concert_singer"], tmp_path / "cs.sqlite", literals=gold)
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"stadium", "singer", "concert", "singer_in_concert"}
    nonempty = 0
    for q in gold:
        rows = execute_readonly(db, q)  # every gold query runs on the synthesized database
        nonempty += bool(rows) and rows != [(0,)] and rows != [(None,)]
    assert nonempty >= 0.8 * len(gold)


def test_keys_are_inferred_from_names_when_the_prompt_has_none(tmp_path):
    text = ("CREATE TABLE singer (singer_id, name, country, age)\nCREATE TABLE stadium (stadium_id, name, city)\n"
            "CREATE TABLE concert (concert_id, name, stadium_id, year)\n-- Answer with one SQLite query.")
    s = schema_from_create_statements("toy", text)
    assert [tb.primary_key for tb in s.tables] == [["singer_id"], ["stadium_id"], ["concert_id"]]
    assert s.foreign_keys == [(("concert", "stadium_id"), ("stadium", "stadium_id"))]
    gold = "SELECT count(*) FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id"
    db = build_database(s, tmp_path / "toy.sqlite", literals=[gold])
    assert execute_readonly(db, gold)[0][0] == len(execute_readonly(db, "SELECT * FROM concert"))  # every concert joins


def test_uninformative_gold_results_are_not_scored(tmp_path):
    provider = DatabaseProvider(tmp_path, schemas={"music": schema_from_spider(SCHEMA_ENTRY)})
    assert is_trivial([]) and is_trivial([(0,)]) and is_trivial([(None, 0)]) and not is_trivial([(2,)])
    # a value that no database holds: count is 0 everywhere, and a wrong query would "match"
    empty = synthetic_execution_match(provider, "music", "SELECT count(*) FROM singer WHERE country = 'Atlantis'",
                                        "SELECT count(*) FROM singer WHERE age > 1000", n_databases=2, max_databases=4)
    assert empty.match is None and empty.uninformative and empty.databases == 4
    ok = synthetic_execution_match(provider, "music", "SELECT count(*) FROM singer", "SELECT count(name) FROM singer",
                                     n_databases=2, max_databases=4)
    assert ok.match is True and ok.databases == 2
    bad = synthetic_execution_match(provider, "music", "SELECT count(*) FROM singer",
                                      "SELECT count(*) FROM concert", n_databases=2)
    assert bad.match is False
