"""Small text-to-SQL examples the evaluation tests share: a two-table Spider schema, gold queries, records."""

from __future__ import annotations

import json
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # beside the checkout, not in it

# Two tables with a foreign key, written as a Spider tables.json entry (column 0 is Spider's '*').
SCHEMA_ENTRY = {
    "db_id": "music",
    "table_names_original": ["singer", "concert"],
    "column_names_original": [[-1, "*"], [0, "singer_id"], [0, "name"], [0, "country"], [0, "age"],
                              [1, "concert_id"], [1, "singer_id"], [1, "year"], [1, "Ticket Price"]],
    "column_types": ["text", "number", "text", "text", "number", "number", "number", "number", "number"],
    "primary_keys": [1, 5],
    "foreign_keys": [[6, 1]],
}
GOLD = [
    "SELECT name FROM singer WHERE age > 30",
    "SELECT count(*) FROM singer WHERE country = 'France'",
    "SELECT country, count(*) FROM singer GROUP BY country",
    "SELECT name FROM singer ORDER BY age DESC",
    "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id WHERE T2.year = 2014",
]
RECORDS = [
    {"db_id": "music", "instruction": "Schema: singer(singer_id, name, country, age).", "input": "Singers over 30?",
     "output": "SELECT name FROM singer WHERE age > 30"},
    {"db_id": "music", "instruction": "Schema: singer(singer_id, name, country, age).", "input": "How many French?",
     "output": "SELECT count(*) FROM singer WHERE country = 'France'"},
    {"db_id": "music", "instruction": "Schema: concert(concert_id, singer_id, year).", "input": "Concerts per year",
     "output": "SELECT year, count(*) FROM concert GROUP BY year"},
]


def write_sql_file(tmp_path: Path) -> Path:
    """RECORDS as data/dev.jsonl with Spider's tables.json beside it."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "tables.json").write_text(json.dumps([SCHEMA_ENTRY]))
    p = d / "dev.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def oracle(records):
    return [r.gold for r in records]
