"""Text-to-SQL scoring: normalized exact match, execution accuracy, and SQLite databases synthesized from schemas.

Spider's real databases are large and not shipped, but its schemas are (tables.json). `build_database` creates the
tables with their types and keys and fills them with seeded synthetic rows (foreign keys point at existing rows,
values repeat so GROUP BY / WHERE / ORDER BY separate right from wrong queries, and literals taken from the gold
queries are planted so that their WHERE clauses select something); each schema gets several such databases with
different seeds and a prediction must agree with the gold query on all of them. Execution accuracy on such content is
a proxy in the spirit of test-suite accuracy (Zhong et al., 2020), not the official Spider number; pass real
`<db_dir>/<db_id>/<db_id>.sqlite` files for that.
"""

from __future__ import annotations

import ast
import itertools
import json
import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from shardtune.errors import DataError

# ---------------------------------------------------------------- SQL text

_TOKEN = re.compile(
    r"""'(?:[^']|'')*'            # single-quoted literal ('' escapes a quote)
      | "(?:[^"]|"")*"            # double-quoted: SQLite reads it as a literal when no column has that name
      | `[^`]*` | \[[^\]]*\]       # quoted identifiers
      | \d+\.\d*|\.\d+|\d+        # numbers
      | [A-Za-z_][A-Za-z_0-9$]*   # words
      | <=|>=|<>|!=|==|\|\|       # two-character operators
      | \S                        # anything else, one character
    """, re.VERBOSE)


def sql_tokens(sql: str) -> list[str]:
    return _TOKEN.findall(sql)


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match: case-folded, one space between tokens, literals in single quotes, quoted
    identifiers unquoted, `<>`/`==` spelled `!=`/`=`, no trailing semicolon."""
    out = []
    for tok in sql_tokens(sql.strip().rstrip(";").strip()):
        if tok[0] in "'\"":
            body = tok[1:-1].replace(tok[0] * 2, tok[0])
            tok = "'" + body.replace("'", "''") + "'"
        elif tok[0] in "`[":
            tok = tok[1:-1]
        elif tok == "<>":
            tok = "!="
        elif tok == "==":
            tok = "="
        out.append(tok.lower())
    text = " ".join(out)
    return text.rstrip(" ;")


def exact_match(gold: str, pred: str) -> bool:
    return normalize_sql(gold) == normalize_sql(pred)


def extract_sql(text: str) -> str:
    """The first SQL statement in a model's answer: inside a ``` fence if there is one, up to the first `;`
    outside quotes."""
    fence = re.search(r"```(?:sql|sqlite)?\s*\n?(.*?)(?:```|$)", text, flags=re.S | re.I)
    if fence:
        text = fence.group(1)
    text = text.strip()
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            return text[:i].strip()
    return text


def has_top_level_order_by(sql: str) -> bool:
    """ORDER BY outside any parenthesis: then the order of the result rows is part of the answer."""
    depth = 0
    toks = [t.lower() for t in sql_tokens(sql)]
    for i, t in enumerate(toks):
        if t == "(":
            depth += 1
        elif t == ")":
            depth -= 1
        elif t == "order" and depth == 0 and i + 1 < len(toks) and toks[i + 1] == "by":
            return True
    return False


def sql_literals(sql: str) -> tuple[list[str], list[float]]:
    """String and number literals of a query (numbers not part of identifiers), to plant into synthesized tables."""
    strings, numbers = [], []
    toks = sql_tokens(sql)
    for i, tok in enumerate(toks):
        if tok[0] in "'\"":
            s = tok[1:-1].replace(tok[0] * 2, tok[0])
            strings.append(s.strip("%"))
        elif re.fullmatch(r"\d+\.?\d*|\.\d+", tok):
            prev = toks[i - 1].lower() if i else ""
            if prev in ("limit", "offset"):
                continue
            numbers.append(float(tok))
    return [s for s in strings if s], numbers


_COMPARE = {"=", "!=", "<>", "==", ">", "<", ">=", "<=", "like"}


def _literal_value(tok: str):
    if tok[0] in "'\"":
        return tok[1:-1].replace(tok[0] * 2, tok[0])
    if re.fullmatch(r"\d+\.?\d*|\.\d+", tok):
        v = float(tok)
        return int(v) if v.is_integer() else v
    return None


def column_literals(sql: str) -> dict[str, list]:
    """Values a query compares columns against, by lower-cased column name: `T1.age > 30`, `name LIKE '%x%'`,
    `year BETWEEN 1990 AND 2000`, `city IN ('a', 'b')`. Planting them in those columns makes WHERE clauses select rows."""
    toks = sql_tokens(sql)
    low = [t.lower() for t in toks]
    out: dict[str, list] = {}

    def add(col: str, v):
        if v is not None and v != "":
            out.setdefault(col.lower(), []).append(v)

    for i, t in enumerate(low):
        if not re.match(r"[a-z_]", t) or t in _COMPARE:
            continue
        nxt = low[i + 1] if i + 1 < len(low) else ""
        if nxt == "not" and i + 2 < len(low):
            i, nxt = i + 1, low[i + 2]
        if nxt in _COMPARE and i + 2 < len(toks):
            v = _literal_value(toks[i + 2])
            if isinstance(v, str) and nxt == "like":
                v = ("like", v)
            add(t, v)
        elif nxt == "between" and i + 4 < len(toks) and low[i + 3] == "and":
            a, b = _literal_value(toks[i + 2]), _literal_value(toks[i + 4])
            add(t, a)
            add(t, b)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                add(t, (a + b) // 2 if isinstance(a, int) and isinstance(b, int) else (a + b) / 2)
        elif nxt == "in" and i + 2 < len(low) and low[i + 2] == "(":
            j = i + 3
            while j < len(toks) and low[j] != ")":
                add(t, _literal_value(toks[j]) if low[j] != "," else None)
                j += 1
    return out


def _like_example(pattern: str, rng: random.Random) -> str:
    """A string matching a LIKE pattern: % becomes a word, _ a letter."""
    out = []
    for ch in pattern:
        out.append(rng.choice(_WORDS) if ch == "%" else ("x" if ch == "_" else ch))
    return "".join(out)


# ---------------------------------------------------------------- execution


class SqlExecutionError(Exception):
    pass


def execute(db_path: str | Path, sql: str, timeout_s: float = 5.0, max_rows: int = 100_000) -> list[tuple]:
    """Run `sql` read-only; raise SqlExecutionError on any SQLite error, on timeout or on a runaway result."""
    conn = sqlite3.connect(f"file:{Path(db_path).resolve()}?mode=ro", uri=True, check_same_thread=False)
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    deadline = time.monotonic() + timeout_s
    # Cartesian products in a wrong prediction can run for minutes; the handler aborts them.
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
    try:
        cur = conn.execute(sql)
        rows = cur.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            raise SqlExecutionError(f"more than {max_rows} rows")
        return [tuple(r) for r in rows]
    except sqlite3.Error as e:
        msg = "timed out" if "interrupted" in str(e) else str(e)
        raise SqlExecutionError(msg) from None
    except (ValueError, OverflowError) as e:
        raise SqlExecutionError(str(e)) from None
    finally:
        conn.close()


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
    uninformative: bool = False  # the gold result was empty / zero / NULL on every synthesized database
    databases: int = 0


def is_trivial(rows: list[tuple]) -> bool:
    """No rows, or only zeros and NULLs: a result that most wrong queries also produce on synthetic data."""
    return all(v is None or v == 0 for r in rows for v in r)


def execution_match(db_path: str | Path, gold_sql: str, pred_sql: str, timeout_s: float = 5.0) -> ExecResult:
    try:
        gold_rows = execute(db_path, gold_sql, timeout_s)
    except SqlExecutionError as e:
        return ExecResult(None, gold_error=str(e), databases=1)
    try:
        pred_rows = execute(db_path, pred_sql, timeout_s)
    except SqlExecutionError as e:
        return ExecResult(False, pred_error=str(e), databases=1)
    return ExecResult(results_match(gold_rows, pred_rows, ordered=has_top_level_order_by(gold_sql)), databases=1)


# ---------------------------------------------------------------- schemas


@dataclass
class Column:
    name: str
    type: str = "text"  # Spider's types: text | number | time | boolean | others


@dataclass
class Table:
    name: str
    columns: list[Column]
    primary_key: list[str] = field(default_factory=list)


@dataclass
class Schema:
    db_id: str
    tables: list[Table]
    # (table, column) -> (referenced table, referenced column)
    foreign_keys: list[tuple[tuple[str, str], tuple[str, str]]] = field(default_factory=list)

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)


def _maybe_literal(v):
    # Some exports store Spider's lists as Python-literal strings.
    return ast.literal_eval(v) if isinstance(v, str) else v


def schema_from_spider(entry: dict) -> Schema:
    """A Schema from one tables.json entry (original table and column names, types, primary and foreign keys)."""
    try:
        tables = _maybe_literal(entry["table_names_original"])
        cols = _maybe_literal(entry["column_names_original"])
        types = _maybe_literal(entry["column_types"])
        pks = _maybe_literal(entry.get("primary_keys", []))
        fks = _maybe_literal(entry.get("foreign_keys", []))
    except (KeyError, ValueError, SyntaxError) as e:
        raise DataError(f"tables.json entry {entry.get('db_id', '?')!r} is not in Spider's format ({e})") from None
    out = [Table(name=t, columns=[]) for t in tables]
    ref: dict[int, tuple[str, str]] = {}
    for idx, ((ti, cname), ctype) in enumerate(zip(cols, types)):
        if ti < 0:
            continue  # the '*' pseudo-column
        out[ti].columns.append(Column(cname, ctype))
        ref[idx] = (tables[ti], cname)
    for pk in pks:
        for idx in (pk if isinstance(pk, list) else [pk]):  # newer exports group composite keys in a list
            if idx in ref:
                tname, cname = ref[idx]
                out[tables.index(tname)].primary_key.append(cname)
    fk_pairs = []
    for src, dst in fks:
        if src in ref and dst in ref:
            fk_pairs.append((ref[src], ref[dst]))
    return Schema(db_id=entry["db_id"], tables=out, foreign_keys=fk_pairs)


_NUMERIC_NAME = re.compile(r"(^|_)(id|population|area|length|altitude|elevation|density|count|num|number|age|year|"
                           r"price|size|height|weight|rank|score|amount|total|capacity)($|_)", re.I)


def schema_from_create_statements(db_id: str, text: str) -> Optional[Schema]:
    """A Schema from `CREATE TABLE name ( col [type], ... )` statements embedded in a prompt (as in DB-GPT-Hub's
    records). Untyped columns get a type guessed from the name (ids, years, population -> number)."""
    tables, fks = [], []
    for m in re.finditer(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?[`\"\[]?(\w+)[`\"\]]?\s*\(", text, re.I):
        depth, end = 1, m.end()
        while end < len(text) and depth:  # the matching parenthesis: column types like DECIMAL(10,2) nest
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        if depth:
            continue  # unterminated statement (e.g. a prompt cut off by truncation)
        body = text[m.end():end - 1]
        cols, pk = [], []
        for part in re.split(r",\s*(?![^()]*\))", body):
            words = part.strip().split()
            if not words:
                continue
            clause = " ".join(words)
            if words[0].upper() == "PRIMARY":
                inner = re.search(r"\((.*?)\)", clause)
                pk += [c.strip(' `"[]') for c in inner.group(1).split(",")] if inner else []
                continue
            if words[0].upper() == "FOREIGN":
                ref = re.search(r"\((.*?)\)\s*REFERENCES\s+[`\"\[]?(\w+)[`\"\]]?\s*\((.*?)\)", clause, re.I)
                if ref:
                    fks.append(((m.group(1), ref.group(1).strip(' `"[]')), (ref.group(2), ref.group(3).strip(' `"[]'))))
                continue
            if words[0].upper() in ("UNIQUE", "CONSTRAINT", "CHECK", "KEY", "INDEX"):
                continue
            name = words[0].strip('`"[]')
            decl = " ".join(words[1:]).lower()
            inline_ref = re.search(r"references\s+[`\"\[]?(\w+)[`\"\]]?\s*\((.*?)\)", decl)
            if inline_ref:
                fks.append(((m.group(1), name), (inline_ref.group(1), inline_ref.group(2).strip(' `"[]'))))
            if decl:
                ctype = "number" if re.search(r"int|real|num|dec|float|double", decl) else (
                    "time" if re.search(r"date|time", decl) else "text")
            else:
                ctype = "number" if _NUMERIC_NAME.search(name) else "text"
            if "primary key" in decl:
                pk.append(name)
            cols.append(Column(name, ctype))
        if cols:
            tables.append(Table(m.group(1), cols, pk))
    if not tables:
        return None
    # Keep references whose both ends exist (a prompt may show only some of the tables).
    cols_of = {t.name: {c.name for c in t.columns} for t in tables}
    fks = [(src, dst) for src, dst in fks if src[1] in cols_of.get(src[0], ()) and dst[1] in cols_of.get(dst[0], ())]
    schema = Schema(db_id, tables, fks)
    if not fks:
        infer_keys(schema)
    return schema


def infer_keys(schema: Schema) -> Schema:
    """Keys by naming convention, for schemas shown without them (`CREATE TABLE concert (concert_id, stadium_id,
    ...)`): `<table>_id` (or `id`) is the table's key, and `<other table>_id` elsewhere references that table, so
    synthesized rows join the way the data's real rows would."""
    def base(name: str) -> str:
        n = name.lower()
        return n[:-1] if n.endswith("s") and not n.endswith("ss") else n

    key_of: dict[str, tuple[str, str]] = {}  # table stem -> (table, key column)
    for t in schema.tables:
        cols = {c.name.lower(): c.name for c in t.columns}
        stem = base(t.name)
        pk = cols.get(f"{stem}_id") or cols.get(f"{t.name.lower()}_id") or cols.get("id")
        if not t.primary_key and pk:
            t.primary_key = [pk]
        if len(t.primary_key) == 1:
            key_of[stem] = (t.name, t.primary_key[0])
    for t in schema.tables:
        for c in t.columns:
            m = re.fullmatch(r"(\w+?)_?id", c.name, re.I)
            if not m or not m.group(1):
                continue
            target = key_of.get(base(m.group(1)))
            if target and target[0] != t.name and target[1].lower() == c.name.lower():
                schema.foreign_keys.append(((t.name, c.name), target))
    return schema


def load_spider_tables(path: str | Path) -> dict[str, Schema]:
    p = Path(path)
    try:
        entries = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read tables file '{path}' ({e}); pass --tables with Spider's tables.json") from None
    if not isinstance(entries, list):
        raise DataError(f"tables file '{path}' must be a JSON list of schemas (Spider's tables.json)")
    return {e["db_id"]: schema_from_spider(e) for e in entries if isinstance(e, dict) and "db_id" in e}


# ---------------------------------------------------------------- synthetic databases

_WORDS = ["alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "omega", "sierra", "tango", "victor", "zulu"]
_DECIMAL_NAME = re.compile(r"price|rating|weight|height|score|average|avg|percent|gpa|amount|lat|long|ratio|rate",
                           re.I)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_type(col: Column) -> str:
    if col.type == "number":
        return "REAL" if _DECIMAL_NAME.search(col.name) else "INTEGER"
    if col.type == "boolean":
        return "INTEGER"
    return "TEXT"


class _ValueMaker:
    """Seeded column values: few distinct values per column (so groups and duplicates exist), plus planted literals."""

    def __init__(self, rng: random.Random, strings: list[str], numbers: list[float],
                 by_column: Optional[dict[str, list]] = None):
        self.rng = rng
        self._by_column_values = {k: list({repr(x): x for x in v}.values()) for k, v in (by_column or {}).items()}
        self.strings = sorted(set(strings))
        nums = set()
        for n in numbers:
            nums.update({n, n - 1, n + 1})
        self.numbers = sorted(nums)

    def value(self, col: Column, row: int, n_distinct: int):
        r = self.rng
        planted = self._by_column_values.get(col.name.lower())
        if planted and r.random() < 0.5:
            v = r.choice(planted)
            if isinstance(v, tuple):  # a LIKE pattern
                return _like_example(v[1], r)
            if col.type == "number" and isinstance(v, (int, float)):
                return v + r.choice((0, 0, -1, 1))  # both sides of `>` / `<` comparisons
            return v
        if col.type == "number":
            decimal = _DECIMAL_NAME.search(col.name) is not None
            if self.numbers and r.random() < 0.35:
                v = r.choice(self.numbers)
                return v if decimal else int(round(v))
            if re.search(r"year", col.name, re.I):
                return r.randint(1995, 2020)
            v = r.randint(1, max(3, n_distinct * 10))
            return round(v + r.random(), 1) if decimal else v
        if col.type == "time":
            return f"{r.randint(1995, 2020)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        if col.type == "boolean":
            return r.choice(["T", "F"])
        if self.strings and r.random() < 0.35:
            return r.choice(self.strings)
        return f"{col.name.lower().replace(' ', '_')} {r.choice(_WORDS[:max(2, n_distinct)])}"

    def unique(self, col: Column, count: int) -> list:
        if col.type == "number":
            return list(range(1, count + 1))
        if col.type == "time":
            return [f"{2000 + i // 12}-{i % 12 + 1:02d}-01" for i in range(count)]
        base = [s for s in self.strings]
        self.rng.shuffle(base)
        vals = base[:count // 3]
        vals += [f"{col.name.lower().replace(' ', '_')} {i}" for i in range(count - len(vals))]
        return vals


def build_database(schema: Schema, path: str | Path, rows_per_table: int = 20, seed: int = 0,
                   literals: Iterable[str] = ()) -> Path:
    """Create `path` as a SQLite file with `schema`'s tables (types, primary and foreign keys) and seeded rows.

    Deterministic for a given (schema, seed, literals). `literals` are gold queries (or their literal values)
    whose strings and numbers are planted into the value pools.
    """
    strings, numbers = [], []
    by_column: dict[str, list] = {}
    for sql in literals:
        s, n = sql_literals(sql)
        strings += s
        numbers += n
        for col, vals in column_literals(sql).items():
            by_column.setdefault(col, []).extend(vals)
    rng = random.Random(f"{schema.db_id}:{seed}")
    maker = _ValueMaker(rng, strings, numbers, by_column)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()

    fk_of = {src: dst for src, dst in schema.foreign_keys}
    # Row counts differ between tables (and seeds), else count(*) over the wrong table would give the right number.
    size = {t.name: rng.randint(max(3, rows_per_table * 6 // 10), max(4, rows_per_table * 14 // 10))
            for t in schema.tables}
    # Values of every referenced column are fixed first, so references resolve whatever the table order is.
    referenced: dict[tuple[str, str], list] = {}
    for _, dst in schema.foreign_keys:
        if dst not in referenced:
            t = schema.table(dst[0]) if any(t.name == dst[0] for t in schema.tables) else None
            col = next((c for c in t.columns if c.name == dst[1]), None) if t else None
            if col is not None:
                referenced[dst] = maker.unique(col, size[dst[0]])
    # A referenced column may itself reference another one (A.x -> B.y, C.z -> A.x): take its values from there.
    for _ in range(3):
        for key in list(referenced):
            parent = fk_of.get(key)
            if parent in referenced and parent != key:
                pool = referenced[parent]
                referenced[key] = rng.sample(pool, min(size[key[0]], len(pool)))

    # sqlite_* names are SQLite's own (Spider lists sqlite_sequence for AUTOINCREMENT tables); SQLite makes them.
    tables = [t for t in schema.tables if not t.name.lower().startswith("sqlite_")]
    conn = sqlite3.connect(tmp, isolation_level=None)
    # A scratch file renamed into place when complete: no journal, no fsync, one transaction for everything.
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    try:
        for t in tables:
            col_defs = [f"{_quote(c.name)} {_sql_type(c)}" for c in t.columns]
            if t.primary_key:
                col_defs.append(f"PRIMARY KEY ({', '.join(_quote(c) for c in t.primary_key)})")
            for (st, sc), (dt, dc) in schema.foreign_keys:
                if st == t.name:
                    col_defs.append(f"FOREIGN KEY ({_quote(sc)}) REFERENCES {_quote(dt)}({_quote(dc)})")
            conn.execute(f"CREATE TABLE {_quote(t.name)} ({', '.join(col_defs)})")

        for t in tables:
            n = size[t.name]
            single_pk = t.primary_key[0] if len(t.primary_key) == 1 else None
            columns: dict[str, list] = {}
            for c in t.columns:
                key = (t.name, c.name)
                if key in referenced:
                    columns[c.name] = list(referenced[key])
                elif key in fk_of and fk_of[key] in referenced:
                    pool = referenced[fk_of[key]]
                    if c.name == single_pk:  # a key that is also a reference (1:1 tables) must stay unique
                        columns[c.name] = rng.sample(pool, min(n, len(pool)))
                    else:  # skewed: some parents get many children (HAVING count(*) > k), some none (NOT IN)
                        weights = [1.0 / (k + 1) for k in range(len(pool))]
                        columns[c.name] = rng.choices(pool, weights=weights, k=n)
                elif c.name == single_pk:
                    columns[c.name] = maker.unique(c, n)
                else:
                    distinct = max(2, n // 3)
                    columns[c.name] = [maker.value(c, i, distinct) for i in range(n)]
            length = min(len(v) for v in columns.values()) if columns else 0
            rows = [tuple(columns[c.name][i] for c in t.columns) for i in range(length)]
            placeholders = ", ".join("?" for _ in t.columns)
            # Composite keys can collide by chance; dropping the duplicate row keeps the key valid.
            conn.executemany(f"INSERT OR IGNORE INTO {_quote(t.name)} VALUES ({placeholders})", rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    tmp.replace(path)
    return path


class DatabaseProvider:
    """Where a record's SQL runs: a real `<db_dir>/<db_id>/<db_id>.sqlite` when present, else databases synthesized
    from the schema registered under the record's schema key (its db_id, or a per-record key for schemas that only
    exist as CREATE TABLE text in the prompt), one per seed, built when first needed."""

    def __init__(self, cache_dir: str | Path, db_dir: str | Path | None = None,
                 schemas: Optional[dict[str, Schema]] = None, seed: int = 0, rows_per_table: int = 20):
        self.cache_dir = Path(cache_dir)
        self.db_dir = Path(db_dir) if db_dir else None
        self.schemas: dict[str, Schema] = dict(schemas or {})
        self.gold: dict[str, list[str]] = {}  # schema key -> gold queries whose literals are planted
        self.seed = seed
        self.rows_per_table = rows_per_table
        self._built: dict[tuple[str, int], Path] = {}

    def add_schema(self, key: str, schema: Schema) -> None:
        self.schemas.setdefault(key, schema)

    def add_gold(self, key: str, sql: str) -> None:
        self.gold.setdefault(key, []).append(sql)

    def real_path(self, db_id: Optional[str]) -> Optional[Path]:
        if self.db_dir is None or not db_id:
            return None
        p = self.db_dir / db_id / f"{db_id}.sqlite"
        return p if p.is_file() else None

    def synthetic_path(self, key: str, i: int) -> Path:
        """The i-th synthesized database of schema `key` (seed + i)."""
        if (key, i) not in self._built:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            self._built[(key, i)] = build_database(
                self.schemas[key], self.cache_dir / f"{safe}.s{self.seed + i}.sqlite",
                rows_per_table=self.rows_per_table, seed=self.seed + i, literals=self.gold.get(key, ()))
        return self._built[(key, i)]


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
            gold_rows = execute(path, gold_sql, timeout_s)
        except SqlExecutionError as e:
            return ExecResult(None, gold_error=str(e), databases=i + 1)
        tried.append((path, gold_rows))
        informative += not is_trivial(gold_rows)
    if informative == 0:
        return ExecResult(None, uninformative=True, databases=len(tried))
    ordered = has_top_level_order_by(gold_sql)
    for path, gold_rows in tried:
        try:
            pred_rows = execute(path, pred_sql, timeout_s)
        except SqlExecutionError as e:
            return ExecResult(False, pred_error=str(e), databases=len(tried))
        if not results_match(gold_rows, pred_rows, ordered=ordered):
            return ExecResult(False, databases=len(tried))
    return ExecResult(True, databases=len(tried))
