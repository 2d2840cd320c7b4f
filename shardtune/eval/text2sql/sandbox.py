"""The only way evaluate runs SQL: one statement that can only read the one database it was given.

Every query, the model's and the data's gold ones alike, goes through `execute_readonly`, which stacks:
- the file opened by URI with mode=ro&immutable=1: read-only, and no -journal / -wal / -shm file is ever created
  beside it (mode=ro alone creates -wal and -shm for a WAL-mode database: measured with python 3.11, SQLite 3.40);
- temp_store=MEMORY, set before the authorizer closes PRAGMA: sorts and temporary b-trees never spill to temp files;
- sqlite3 limits: no attached databases (ATTACH, and VACUUM INTO, which attaches its target), values up to 32 MiB,
  statements up to 1 MB;
- an authorizer allow-list: SELECT, reading columns, recursive CTEs, and functions except those acting outside the
  query; everything else is denied when the statement is prepared, before it runs: INSERT / UPDATE / DELETE, DDL,
  ATTACH / DETACH, PRAGMA (table-valued pragma_* functions too), transactions, ANALYZE, REINDEX, VACUUM;
- one statement only, a progress-handler deadline, a row cap.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

# What went wrong, for the report: the prediction was empty, did not parse, was refused by the sandbox, ran out of
# time, produced too much, or failed like SQL fails (no such column, type errors, ...).
ERROR_KINDS = ("empty", "unparsable", "refused", "timeout", "too_large", "error")

MAX_VALUE_BYTES = 32 << 20
MAX_SQL_BYTES = 1 << 20

# Authorizer action codes are SQLite's stable C API numbers; python < 3.11 lacks some of the names.
_FUNCTION = getattr(sqlite3, "SQLITE_FUNCTION", 31)
_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, _FUNCTION, _RECURSIVE})
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{n}"): n.replace("_", " ") for n in (
        "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
        "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX",
        "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "PRAGMA",
        "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE",
        "DROP_VTABLE", "SAVEPOINT") if hasattr(sqlite3, f"SQLITE_{n}")}
# No application functions are registered on these connections, so only SQLite's built-ins exist; of those only
# these act outside the query (load a library, hand out or install a C pointer). The file functions belong to the
# sqlite3 shell's extensions and are listed in case a build compiles them in.
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit", "fsdir",
                               "zipfile", "sqlar_compress", "sqlar_uncompress"})
_SYNTAX = re.compile(r"syntax error|incomplete input|unrecognized token", re.I)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?(?:\*/|$)", re.S)


class SqlExecutionError(Exception):
    """A statement was refused or failed; `kind` (one of ERROR_KINDS) says which."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


def _authorizer(refusals: list[str]):
    def check(action: int, arg1: Optional[str], arg2: Optional[str], _db: Optional[str], _source: Optional[str]):
        if action == _FUNCTION:
            if (arg2 or "").lower() not in _DENIED_FUNCTIONS:
                return sqlite3.SQLITE_OK
            refusals.append(f"function {arg2}()")
            return sqlite3.SQLITE_DENY
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        what = _ACTION_NAMES.get(action, f"action {action}")
        refusals.append(f"{what} {arg1!r}" if arg1 else what)
        return sqlite3.SQLITE_DENY
    return check


def _open(db_path: Path, refusals: list[str]) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{quote(str(db_path))}?mode=ro&immutable=1", uri=True, isolation_level=None)
    conn.execute("PRAGMA temp_store=MEMORY")  # before the authorizer, which refuses every PRAGMA
    if hasattr(conn, "setlimit"):  # python >= 3.11; the authorizer refuses ATTACH either way
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
    conn.set_authorizer(_authorizer(refusals))
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    return conn


def _classify(e: BaseException, refusals: list[str], timeout_s: float) -> SqlExecutionError:
    msg = str(e)
    if refusals:
        return SqlExecutionError(f"refused: {refusals[0]} (evaluation may only read the given database)", "refused")
    if "one statement at a time" in msg:
        return SqlExecutionError("refused: more than one statement", "refused")
    if "interrupted" in msg:
        return SqlExecutionError(f"timed out after {timeout_s:g} s", "timeout")
    if _SYNTAX.search(msg):
        return SqlExecutionError(msg, "unparsable")
    if isinstance(e, MemoryError) or "too big" in msg:
        return SqlExecutionError(f"{msg or 'out of memory'} (values are capped at {MAX_VALUE_BYTES >> 20} MiB)",
                                 "too_large")
    return SqlExecutionError(msg, "error")


def execute_readonly(db_path: str | Path, sql: str, timeout_s: float = 5.0, max_rows: int = 100_000) -> list[tuple]:
    """The rows of `sql` on the database at `db_path`, read-only; SqlExecutionError when the statement is empty,
    does not parse, is refused (anything but reading), runs past `timeout_s`, returns more than `max_rows` rows,
    or fails."""
    if not _COMMENTS.sub("", sql).strip():
        raise SqlExecutionError("empty statement (only comments)" if sql.strip() else "empty statement", "empty")
    path = Path(db_path).resolve()
    if not path.is_file():
        raise SqlExecutionError(f"database '{path}' not found", "error")
    refusals: list[str] = []
    conn = None
    try:
        conn = _open(path, refusals)
        deadline = time.monotonic() + timeout_s
        # Cartesian products and endless recursive CTEs in a wrong query would run for minutes; the handler stops them.
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        cur = conn.execute(sql)
        if cur.description is None:  # a statement with nothing to authorize, e.g. REINDEX with no index to rebuild
            raise SqlExecutionError("refused: not a query (it returns no rows)", "refused")
        rows = cur.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            raise SqlExecutionError(f"more than {max_rows} rows", "too_large")
        return [tuple(r) for r in rows]
    except (sqlite3.Error, sqlite3.Warning, MemoryError) as e:  # python < 3.12 raises Warning for a 2nd statement
        raise _classify(e, refusals, timeout_s) from None
    except (ValueError, OverflowError) as e:
        raise SqlExecutionError(str(e)) from None
    finally:
        if conn is not None:
            conn.close()


def syntax_error(sql: str) -> Optional[str]:
    """SQLite's parse error for `sql`, or None when it parses. Names are not resolved (there is no schema here), and
    an authorizer that denies everything makes sure the statement is only parsed, never run."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.set_authorizer(lambda *_: sqlite3.SQLITE_DENY)
    try:
        conn.execute(sql)
    except (sqlite3.Error, sqlite3.Warning) as e:
        return str(e) if _SYNTAX.search(str(e)) else None
    finally:
        conn.close()
    return None
