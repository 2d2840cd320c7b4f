"""Evaluation records: any training data format read by the training reader and laid out as training lays it out
(conversation up to the answer, gold answer), plus the db_id a text-to-SQL record runs against."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shardtune.data.split import record_db_id  # the same rule `shardtune split` groups records by
from shardtune.errors import DataError


@dataclass
class EvalRecord:
    """One scored example: the conversation up to the answer and the gold answer, laid out as training lays the same
    record out (shardtune.data.formats.prompt_and_answer); for SQL, where to run it. Format `text` records have no
    conversation: the whole text is the target."""

    index: int
    messages: list[dict]
    gold: str
    db_id: Optional[str] = None
    schema_key: Optional[str] = None
    where: str = ""

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""

    @property
    def is_text(self) -> bool:
        return not self.messages


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(file:line, record) for every record, through the training data reader: the same file types (JSON, JSONL,
    CSV, Parquet, builtin:toy-sql) and the same one-line errors naming file:line."""
    from shardtune.data.pipeline import BadLines, iter_records

    return list(iter_records(str(path), "--data", BadLines("error", "--data")))


def to_eval_record(i: int, rec: dict, where: str = "") -> EvalRecord:
    """One record of any training format -> EvalRecord; the db_id comes from the record or, for DB-GPT-Hub's Spider
    export, from its instruction ("<db_id> contains tables such as ...")."""
    from shardtune.data import formats

    where = where or f"record {i}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is {type(rec).__name__}, expected a JSON object")
    if isinstance(rec.get("sql"), dict) and isinstance(rec.get("query"), str):
        # Spider's dev.json: `sql` is the parsed tree, the SQL text is `query` (shardtune.data reads `sql` first).
        rec = {k: v for k, v in rec.items() if k != "sql"}
    try:
        messages, gold = formats.prompt_and_answer(rec)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    return EvalRecord(index=i, messages=messages, gold=gold.strip(), where=where, db_id=record_db_id(rec))


def looks_like_sql(text: str) -> bool:
    return bool(re.match(r"\s*(```(sql)?\s*)?(select|with)\b", text, re.I))
