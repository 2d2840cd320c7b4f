"""The SQL sandbox: hostile statements are refused or fail, and leave no file behind and the database untouched;
ordinary reads still work."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from shardtune.eval.text2sql.sandbox import ERROR_KINDS, SqlExecutionError, execute_readonly, syntax_error
from shardtune.eval.text2sql.synth import build_database, schema_from_spider

from sql_examples import GOLD, SCHEMA_ENTRY

# (statement with {d} for the sandbox's directory, the kinds it may fail as)
HOSTILE = [
    ("ATTACH DATABASE '{d}/x.db' AS x", {"refused"}),
    ("ATTACH 'file:{d}/x2.db?mode=rwc' AS x", {"refused"}),
    ("ATTACH 'x3.db' AS x", {"refused"}),  # relative: would land in the working directory
    ("VACUUM INTO '{d}/y.db'", {"refused"}),
    ("VACUUM", {"refused"}),
    ("CREATE TABLE evil (a)", {"refused"}),
    ("CREATE TEMP TABLE evil AS SELECT * FROM singer", {"refused"}),
    ("CREATE VIEW v AS SELECT 1", {"refused"}),
    ("CREATE TRIGGER tr AFTER INSERT ON singer BEGIN SELECT 1; END", {"refused"}),
    ("CREATE VIRTUAL TABLE f USING fts5(a)", {"refused"}),
    ("CREATE INDEX i ON singer(age)", {"refused"}),
    ("INSERT INTO singer (singer_id, name) VALUES (999, 'x')", {"refused"}),
    ("REPLACE INTO singer (singer_id, name) VALUES (1, 'x')", {"refused"}),
    ("UPDATE singer SET age = 0", {"refused"}),
    ("DELETE FROM singer", {"refused"}),
    ("DROP TABLE singer", {"refused"}),
    ("ALTER TABLE singer RENAME TO s2", {"refused"}),
    ("PRAGMA journal_mode=WAL", {"refused"}),
    ("PRAGMA writable_schema=ON", {"refused"}),
    ("PRAGMA temp_store_directory = '{d}'", {"refused"}),
    ("PRAGMA temp_store = FILE", {"refused"}),
    ("SELECT * FROM pragma_table_info('singer')", {"refused"}),
    ("SELECT load_extension('{d}/evil.so')", {"refused"}),
    ("SELECT fts3_tokenizer('simple')", {"refused"}),  # hands out a C pointer; with two arguments installs one
    ("SELECT 1; ATTACH DATABASE '{d}/z.db' AS z", {"refused"}),
    ("SELECT name FROM singer; DROP TABLE singer", {"refused"}),
    ("WITH x AS (SELECT 1000 AS a) INSERT INTO singer (singer_id) SELECT a FROM x", {"refused"}),
    ("WITH x AS (SELECT 1) DELETE FROM singer WHERE singer_id IN (SELECT * FROM x)", {"refused"}),
    ("SELECT readfile('/etc/passwd')", {"refused", "error"}),  # the shell's file functions: absent here
    ("SELECT writefile('{d}/w.txt', 'x')", {"refused", "error"}),
    ("BEGIN IMMEDIATE", {"refused"}),
    ("SAVEPOINT s", {"refused"}),
    ("ANALYZE", {"refused"}),
    ("REINDEX", {"refused"}),
    ("DETACH DATABASE main", {"refused"}),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", {"timeout"}),
    ("SELECT count(*) FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g", {"timeout"}),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5000) SELECT x FROM c", {"too_large"}),
    ("SELECT zeroblob(100000000)", {"too_large"}),
    ("", {"empty"}),
    ("-- only a comment", {"empty"}),
    ("SELEC name FROM singer", {"unparsable"}),
]


@pytest.fixture(scope="module")
def music_db_file(tmp_path_factory) -> Path:
    return build_database(schema_from_spider(SCHEMA_ENTRY), tmp_path_factory.mktemp("src") / "music.sqlite",
                          literals=GOLD)


@pytest.fixture
def box(music_db_file, tmp_path, monkeypatch) -> Path:
    """A directory holding only the database; the working directory too, so relative paths would land here."""
    d = tmp_path / "box"
    d.mkdir()
    shutil.copy(music_db_file, d / "music.sqlite")
    monkeypatch.chdir(d)
    return d


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("sql,kinds", HOSTILE, ids=[h[0][:40] or "empty" for h in HOSTILE])
def test_hostile_statement_is_refused_and_touches_nothing(box, sql, kinds):
    assert kinds <= set(ERROR_KINDS)
    before = _snapshot(box.parent)
    with pytest.raises(SqlExecutionError) as e:
        execute_readonly(box / "music.sqlite", sql.format(d=box), timeout_s=0.3, max_rows=1000)
    assert e.value.kind in kinds, (e.value.kind, str(e.value))
    assert _snapshot(box.parent) == before  # no new file anywhere, the database byte-identical
    if e.value.kind == "refused":
        assert str(e.value).startswith("refused: ")


def test_refusal_names_what_was_refused(box):
    with pytest.raises(SqlExecutionError, match=r"refused: ATTACH '.*x\.db'"):
        execute_readonly(box / "music.sqlite", f"ATTACH DATABASE '{box}/x.db' AS x")
    with pytest.raises(SqlExecutionError, match="refused: INSERT 'singer'"):
        execute_readonly(box / "music.sqlite", "WITH x AS (SELECT 1) INSERT INTO singer (singer_id) SELECT * FROM x")
    with pytest.raises(SqlExecutionError, match=r"refused: function load_extension\(\)"):
        execute_readonly(box / "music.sqlite", "SELECT load_extension('x')")
    with pytest.raises(SqlExecutionError, match="refused: more than one statement"):
        execute_readonly(box / "music.sqlite", "SELECT 1; SELECT 2")


def test_reads_still_work(box, tmp_path):
    db = box / "music.sqlite"
    n = execute_readonly(db, "SELECT count(*) FROM singer")[0][0]
    assert n >= 10
    joined = execute_readonly(db, "SELECT T1.name, T2.year FROM singer AS T1 JOIN concert AS T2 "
                                  "ON T1.singer_id = T2.singer_id WHERE T1.age > (SELECT avg(age) FROM singer)")
    assert joined and all(len(r) == 2 for r in joined)
    assert execute_readonly(db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 3) "
                                "SELECT x FROM c") == [(1,), (2,), (3,)]
    assert ("table", "singer") in execute_readonly(db, "SELECT type, name FROM sqlite_master")
    assert execute_readonly(db, "SELECT upper('a'), round(2.5), strftime('%Y', '2014-01-02'), "
                                "coalesce(NULL, 1)") == [("A", 3.0, "2014", 1)]
    assert execute_readonly(db, "SELECT name FROM singer;  -- trailing comment") == \
        execute_readonly(db, "SELECT name FROM singer")
    odd = tmp_path / "dir with space #1 ?x" / "m%20.sqlite"  # URI metacharacters in the path
    odd.parent.mkdir()
    shutil.copy(db, odd)
    assert execute_readonly(odd, "SELECT count(*) FROM singer")[0][0] == n
    with pytest.raises(SqlExecutionError, match="not found"):
        execute_readonly(tmp_path / "missing.sqlite", "SELECT 1")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database " * 100)
    with pytest.raises(SqlExecutionError, match="file is not a database") as e:
        execute_readonly(junk, "SELECT * FROM singer")
    assert e.value.kind == "error"


def test_wal_database_gets_no_side_files(box):
    db = box / "music.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()  # the last connection checkpoints and removes -wal / -shm
    before = _snapshot(box)
    assert list(before) == ["music.sqlite"]
    assert execute_readonly(db, "SELECT count(*) FROM singer")[0][0] > 0
    assert _snapshot(box) == before
    # why immutable=1: a plain read-only connection creates -wal and -shm beside a WAL database
    control = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    control.execute("SELECT count(*) FROM singer").fetchall()
    control.close()
    assert set(_snapshot(box)) > set(before)


def _temp_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "(deleted)" in target or "etilqs" in target:  # SQLite's temp files are unlinked right after opening
            out.add(target)
    return out


def _temp_files_while(fn) -> set[str]:
    seen: set[str] = set()
    done = threading.Event()

    def poll():
        while not done.is_set():
            seen.update(_temp_fds())
            time.sleep(0.0005)

    before = _temp_fds()
    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return seen - before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see unlinked temp files")
def test_big_sort_uses_no_temp_file(tmp_path):
    db = tmp_path / "big.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x" * 50) for i in range(300)])
    conn.commit()
    conn.close()
    sql = "SELECT a.a, b.a, a.b FROM t AS a, t AS b ORDER BY a.b || b.a DESC"  # 90,000 rows, sorted past the cache

    def control():
        c = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
        c.execute(sql).fetchall()
        c.close()

    if not _temp_files_while(control):
        pytest.skip("this SQLite build does not spill the sort to a temp file, so there is nothing to prevent")
    rows: list = []
    assert not _temp_files_while(lambda: rows.extend(execute_readonly(db, sql, timeout_s=30)))
    assert len(rows) == 90_000


def test_syntax_error_only_parses():
    assert "syntax error" in syntax_error("SELEC a FROM t")
    assert "incomplete input" in syntax_error("SELECT a FROM t WHERE (")
    assert syntax_error("SELECT count(*) FROM nowhere") is None  # names are not checked: there is no schema
    assert syntax_error("DROP TABLE t") is None  # parses (the sandbox refuses it when it runs)
    assert syntax_error("") is None
