"""Databases synthesized from schemas: Spider's tables.json or CREATE TABLE text in a prompt -> Schema -> a seeded
SQLite file whose rows make the gold queries' WHERE / GROUP BY / JOIN clauses select something.

Spider's real databases are large and not shipped, but its schemas are (tables.json). `build_database` creates the
tables with their types and keys and fills them with seeded synthetic rows (foreign keys point at existing rows,
values repeat so GROUP BY / WHERE / ORDER BY separate right from wrong queries, and literals taken from the gold
queries are planted so that their WHERE clauses select something); each schema gets several such databases with
different seeds (execute.synthetic_execution_match). Execution accuracy on such content is a proxy in the spirit of
test-suite accuracy (Zhong et al., 2020), not the official Spider number; pass real
`<db_dir>/<db_id>/<db_id>.sqlite` files for that.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from shardtune.errors import DataError
from shardtune.eval.text2sql.normalize import column_literals, sql_literals

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


def _like_example(pattern: str, rng: random.Random) -> str:
    """A string matching a LIKE pattern: % becomes a word, _ a letter."""
    out = []
    for ch in pattern:
        out.append(rng.choice(_WORDS) if ch == "%" else ("x" if ch == "_" else ch))
    return "".join(out)


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


_PLAIN_NAME = re.compile(r"\w[\w.-]*")


def db_dir_path(db_dir: str | Path, db_id: str) -> Optional[Path]:
    """Where a real database for `db_id` lives under `db_dir` (Spider's layout); None for a db_id that is not a plain
    name (a path, `..`): the data does not get to choose which file on the machine is opened."""
    return Path(db_dir) / db_id / f"{db_id}.sqlite" if _PLAIN_NAME.fullmatch(db_id) else None


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
        p = db_dir_path(self.db_dir, db_id) if self.db_dir is not None and db_id else None
        return p if p is not None and p.is_file() else None

    def synthetic_path(self, key: str, i: int) -> Path:
        """The i-th synthesized database of schema `key` (seed + i)."""
        if (key, i) not in self._built:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            self._built[(key, i)] = build_database(
                self.schemas[key], self.cache_dir / f"{safe}.s{self.seed + i}.sqlite",
                rows_per_table=self.rows_per_table, seed=self.seed + i, literals=self.gold.get(key, ()))
        return self._built[(key, i)]
