"""Scoring text-to-SQL records: which database each record runs on (a real one under --db-dir, strictly, or ones
synthesized from tables.json / the prompt's CREATE TABLE text), exact match, execution accuracy, and a status per
record that says how a prediction failed."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from shardtune.errors import DataError
from shardtune.eval.records import EvalRecord
from shardtune.eval.text2sql.execute import execution_match, synthetic_execution_match
from shardtune.eval.text2sql.normalize import exact_match, extract_sql
from shardtune.eval.text2sql.sandbox import ERROR_KINDS, syntax_error
from shardtune.eval.text2sql.synth import (DatabaseProvider, Schema, db_dir_path, load_spider_tables,
                                           schema_from_create_statements)

PROXY_NOTE = ("execution accuracy on synthesized databases (schema from tables.json or the prompt's CREATE TABLE "
              "statements, seeded rows, several databases per schema) is a proxy in the spirit of test-suite "
              "accuracy, not the official Spider number; pass --db-dir with the real <db_id>/<db_id>.sqlite files "
              "for that")
# A record's status: correct, wrong_result, one of sandbox.ERROR_KINDS (the prediction failed that way), or unscored
# (no database, or the gold query fails / is uninformative). Failures are listed worst first in the report.
FAILURE_ORDER = ERROR_KINDS + ("wrong_result",)
_DB_DIR_FIX = ("pass the folder that holds <db_id>/<db_id>.sqlite (Spider's database/), or leave --db-dir out to "
               "score on databases synthesized from the schemas")


def check_db_dir(db_dir: str | Path, records: Sequence[EvalRecord]) -> None:
    """With --db-dir every record runs on its real database, so every one must be there: a directory that is not
    one, holds no database, or lacks one a record needs is an error here (before any model is loaded), never a
    quiet fallback to synthesized databases."""
    d = Path(db_dir)
    if not d.is_dir():
        raise DataError(f"--db-dir '{db_dir}' is not a directory; {_DB_DIR_FIX}")
    if not any(d.glob("*/*.sqlite")):
        raise DataError(f"--db-dir '{db_dir}' holds no <db_id>/<db_id>.sqlite databases; {_DB_DIR_FIX}")
    no_id = [r for r in records if not r.db_id]
    if no_id:
        raise DataError(f"{no_id[0].where}: record has no db_id, so --db-dir '{db_dir}' cannot say which database it "
                        f"runs on ({len(no_id)} such records); add db_id to the records, or leave --db-dir out to "
                        "score on databases synthesized from the prompt's schema")
    missing = sorted({r.db_id for r in records if not _is_file(db_dir_path(d, r.db_id))})
    if missing:
        where = db_dir_path(d, missing[0])
        looked = f"looked for {where}" if where else "not a plain name"
        more = f"; {len(missing)} db_ids missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
        raise DataError(f"--db-dir '{db_dir}' has no database for db_id '{missing[0]}' ({looked}{more}); copy the "
                        f"missing databases there, or leave --db-dir out to score on synthesized databases")


def _is_file(p: Optional[Path]) -> bool:
    return p is not None and p.is_file()


def find_tables_file(data_path: Path) -> Optional[Path]:
    """Spider keeps tables.json next to dev.json; DB-GPT-Hub-style copies name it *tables*.json."""
    d = data_path.parent
    for name in ("tables.json", "spider_tables.json"):
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*tables*.json"))
    return found[0] if found else None


def load_schemas(tables: str | Path | None, data_name: str, records: Sequence[EvalRecord]) -> dict[str, Schema]:
    if tables:
        if not Path(tables).is_file():
            raise DataError(f"tables file '{tables}' not found; pass --tables with Spider's tables.json")
        return load_spider_tables(tables)
    if data_name.startswith("builtin:") or not any(r.db_id for r in records):
        return {}
    found = find_tables_file(Path(data_name))
    return load_spider_tables(found) if found else {}


def schema_key(r: EvalRecord, schemas: dict[str, Schema], provider: DatabaseProvider) -> Optional[str]:
    """Which schema a record's SQL runs against: the CREATE TABLE statements in its prompt (what the model was
    shown) unless tables.json knows the db_id with all those tables (it adds types and keys), else tables.json."""
    text = "\n".join(m["content"] for m in r.messages)
    shown = schema_from_create_statements("prompt", text)
    known = schemas.get(r.db_id) if r.db_id else None
    if known is not None:
        names = {t.name.lower() for t in known.tables}
        if shown is None or all(t.name.lower() in names for t in shown.tables):
            return r.db_id
    if shown is None:
        return None
    layout = json.dumps([[t.name, [c.name for c in t.columns]] for t in shown.tables])
    key = f"{r.db_id or 'db'}-{hashlib.sha1(layout.encode()).hexdigest()[:10]}"
    shown.db_id = key
    provider.add_schema(key, shown)
    return key


def prepare(records: Sequence[EvalRecord], provider: DatabaseProvider, schemas: dict[str, Schema]) -> None:
    """Give each record without a real database its schema key, and plant every gold query's literals."""
    for r in records:
        if provider.real_path(r.db_id) is None:
            r.schema_key = schema_key(r, schemas, provider)
        if r.schema_key:
            provider.add_gold(r.schema_key, r.gold)


def _prediction_problem(pred_sql: str) -> tuple[Optional[str], Optional[str]]:
    """(kind, note) for a prediction that cannot be right whatever the database: empty or not parsable SQL."""
    if not pred_sql.strip():
        return "empty", "prediction is empty"
    err = syntax_error(pred_sql)
    return ("unparsable", f"prediction does not parse: {err}") if err else (None, None)


def score_sql(records: Sequence[EvalRecord], preds: Sequence[str], provider: DatabaseProvider,
              timeout_s: float, n_databases: int) -> tuple[dict, list[dict]]:
    rows = []
    sources: Counter = Counter()
    unscored: Counter = Counter()
    for r, p in zip(records, preds):
        pred_sql = extract_sql(p)
        row = {"index": r.index, "where": r.where, "db_id": r.db_id, "question": r.prompt[-300:], "gold": r.gold,
               "pred": pred_sql, "exact": exact_match(r.gold, pred_sql), "exec": None}
        kind, note = _prediction_problem(pred_sql)
        real = provider.real_path(r.db_id)
        if real is not None:
            res, source = execution_match(real, r.gold, pred_sql, timeout_s=timeout_s), "real"
        elif r.schema_key:
            res = synthetic_execution_match(provider, r.schema_key, r.gold, pred_sql, n_databases=n_databases,
                                            max_databases=max(8, 2 * n_databases), timeout_s=timeout_s)
            source = "synthetic"
        else:
            res, source = None, None
            row["exec_note"] = "no database or schema for this record"
            unscored["no_database"] += 1
        if res is not None:
            row["exec"], row["db"], row["databases"] = res.match, source, res.databases
            sources[source] += 1
            if res.gold_error:
                row["exec_note"] = f"gold query failed: {res.gold_error}"
                unscored["gold_failed"] += 1
            elif res.uninformative:
                row["exec_note"] = "gold result empty/zero on every synthesized database: not scored"
                unscored["uninformative"] += 1
            elif res.pred_error:
                row["exec_note"] = f"prediction failed: {res.pred_error}"
                kind = kind or res.pred_error_kind
        if kind and "exec_note" not in row:
            row["exec_note"] = note
        row["status"] = kind or {True: "correct", False: "wrong_result", None: "unscored"}[row["exec"]]
        rows.append(row)
    scored = [x for x in rows if x["exec"] is not None]
    kinds = Counter(x["status"] for x in rows if x["status"] in ERROR_KINDS)
    summary = {
        "metric": "sql",
        "n": len(rows),
        "exact_match": sum(x["exact"] for x in rows) / len(rows) if rows else float("nan"),
        "execution_accuracy": sum(bool(x["exec"]) for x in scored) / len(scored) if scored else None,
        "execution_scored": len(scored),
        "execution_unscored": {k: unscored.get(k, 0) for k in ("no_database", "gold_failed", "uninformative")},
        # every record whose prediction is empty, does not parse, was refused or failed to run, scored or not
        "prediction_errors": sum(kinds.values()),
        "prediction_error_kinds": {k: kinds.get(k, 0) for k in ERROR_KINDS},
        "databases": dict(sources),
    }
    if sources.get("synthetic"):
        summary["note"] = PROXY_NOTE
    return summary, rows
