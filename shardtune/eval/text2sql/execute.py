"""Execution accuracy: run the gold and the predicted query (through sandbox.execute_readonly) on a real database or
on several synthesized ones, and compare the results as multisets of rows (as sequences under a top-level ORDER BY)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from shardtune.eval.text2sql.normalize import has_top_level_order_by
from shardtune.eval.text2sql.sandbox import SqlExecutionError, execute_readonly
from shardtune.eval.text2sql.synth import DatabaseProvider


def _canon_value(v: Any) -> Any:
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        return round(v, 6)
    if isinstance(v, bytes):
        return v.hex()
    return v


def _canon_rows(rows: list[tuple]) -> list[tuple]:
    return [tuple(_canon_value(v) for v in r) for r in rows]


def results_match(gold: list[tuple], pred: list[tuple], ordered: bool, max_permute_cols: int = 6) -> bool:
    """Same rows (as a multiset, or as a sequence when `ordered`), allowing the columns in another order."""
    g, p = _canon_rows(gold), _canon_rows(pred)
    if len(g) != len(p):
        return False
    if not g:
        return True
    ncols = len(g[0])
    if any(len(r) != ncols for r in p):
        return False

    def same(rows_p):
        return rows_p == g if ordered else Counter(rows_p) == Counter(g)

    if same(p):
        return True
    if ncols > max_permute_cols:
        return False
    gold_col_sets = [Counter(r[i] for r in g) for i in range(ncols)]
    for perm in itertools.permutations(range(ncols)):
        if perm == tuple(range(ncols)):
            continue
        if any(Counter(r[perm[i]] for r in p) != gold_col_sets[i] for i in range(ncols)):
            continue  # cheap per-column pre-check before comparing whole rows
        if same([tuple(r[i] for i in perm) for r in p]):
            return True
    return False


@dataclass
class ExecResult:
    match: Optional[bool]  # None: not scored (the gold query fails, or no database can tell right from wrong)
    gold_error: Optional[str] = None
    pred_error: Optional[str] = None
    pred_error_kind: Optional[str] = None  # sandbox.ERROR_KINDS: empty, unparsable, refused, timeout, too_large, error
    uninformative: bool = False  # the gold result was empty / zero / NULL on every synthesized database
    databases: int = 0


def is_trivial(rows: list[tuple]) -> bool:
    """No rows, or only zeros and NULLs: a result that most wrong queries also produce on synthetic data."""
    return all(v is None or v == 0 for r in rows for v in r)


def execution_match(db_path: str | Path, gold_sql: str, pred_sql: str, timeout_s: float = 5.0) -> ExecResult:
    """Gold and prediction on one (real) database. A gold query that fails leaves the record unscored; a prediction
    that fails is wrong, with the sandbox's reason and kind."""
    try:
        gold_rows = execute_readonly(db_path, gold_sql, timeout_s)
    except SqlExecutionError as e:
        return ExecResult(None, gold_error=str(e), databases=1)
    try:
        pred_rows = execute_readonly(db_path, pred_sql, timeout_s)
    except SqlExecutionError as e:
        return ExecResult(False, pred_error=str(e), pred_error_kind=e.kind, databases=1)
    return ExecResult(results_match(gold_rows, pred_rows, ordered=has_top_level_order_by(gold_sql)), databases=1)


def synthetic_execution_match(provider: DatabaseProvider, key: str, gold_sql: str, pred_sql: str,
                              n_databases: int = 3, max_databases: int = 8, timeout_s: float = 5.0) -> ExecResult:
    """Test-suite-style comparison on synthesized databases.

    Databases are taken in seed order until `n_databases` of them give the gold query an informative result (not
    empty / zero / NULL) or `max_databases` were built; the prediction must then give the gold result on every one
    of them. A record whose gold result is uninformative everywhere is not scored, since on such data most wrong
    queries would also "match" (e.g. any count over an empty join is 0).
    """
    # Which databases to use depends on the gold query alone, so every predictor is scored on the same records.
    tried: list[tuple[Path, list[tuple]]] = []
    informative = 0
    for i in range(max_databases):
        if informative >= n_databases:
            break
        path = provider.synthetic_path(key, i)
        try:
            gold_rows = execute_readonly(path, gold_sql, timeout_s)
        except SqlExecutionError as e:
            return ExecResult(None, gold_error=str(e), databases=i + 1)
        tried.append((path, gold_rows))
        informative += not is_trivial(gold_rows)
    if informative == 0:
        return ExecResult(None, uninformative=True, databases=len(tried))
    ordered = has_top_level_order_by(gold_sql)
    for path, gold_rows in tried:
        try:
            pred_rows = execute_readonly(path, pred_sql, timeout_s)
        except SqlExecutionError as e:
            return ExecResult(False, pred_error=str(e), pred_error_kind=e.kind, databases=len(tried))
        if not results_match(gold_rows, pred_rows, ordered=ordered):
            return ExecResult(False, databases=len(tried))
    return ExecResult(True, databases=len(tried))
