"""`shardtune evaluate`: score a trained adapter on a data file.

Text-to-SQL data (gold answers that are SQL) gets normalized exact match and execution accuracy on SQLite databases
(real ones from --db-dir, else synthesized from the schemas: a proxy, see shardtune.export.text2sql). Other data gets
eval loss / perplexity on the response tokens and exact match of greedy generations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from shardtune.errors import ConfigError, DataError
from shardtune.export import text2sql as t2s
from shardtune.export.adapter import RunInfo, load_for_inference, load_run
from shardtune.export.generate import PromptStyle, generate_ids, prompt_style, render_example_ids, render_prompt_ids

METRICS = ("auto", "sql", "generic")
PROXY_NOTE = ("execution accuracy on synthesized databases (schema from tables.json or the prompt's CREATE TABLE "
              "statements, seeded rows, several databases per schema) is a proxy in the spirit of test-suite "
              "accuracy, not the official Spider number; pass --db-dir with the real <db_id>/<db_id>.sqlite files "
              "for that")


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


# ---------------------------------------------------------------- reading records


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(file:line, record) for every record, through the training data reader: the same file types (JSON, JSONL,
    CSV, Parquet, builtin:toy-sql) and the same one-line errors naming file:line."""
    from shardtune.data.pipeline import BadLines, iter_records

    return list(iter_records(str(path), "--data", BadLines("error", "--data")))


_DB_ID_IN_TEXT = re.compile(r"^\s*(\w+) contains tables such as", re.I)  # DB-GPT-Hub's Spider instructions


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
    db_id = rec.get("db_id")
    if db_id is None and isinstance(rec.get("instruction"), str):
        m = _DB_ID_IN_TEXT.match(rec["instruction"])
        db_id = m.group(1) if m else None
    return EvalRecord(index=i, messages=messages, gold=gold.strip(), where=where,
                      db_id=str(db_id) if db_id is not None else None)


def find_tables_file(data_path: Path) -> Optional[Path]:
    """Spider keeps tables.json next to dev.json; DB-GPT-Hub-style copies name it *tables*.json."""
    d = data_path.parent
    for name in ("tables.json", "spider_tables.json"):
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*tables*.json"))
    return found[0] if found else None


def _load_schemas(tables: str | Path | None, data_name: str, records: Sequence[EvalRecord]) -> dict[str, t2s.Schema]:
    if tables:
        if not Path(tables).is_file():
            raise DataError(f"tables file '{tables}' not found; pass --tables with Spider's tables.json")
        return t2s.load_spider_tables(tables)
    if data_name.startswith("builtin:") or not any(r.db_id for r in records):
        return {}
    found = find_tables_file(Path(data_name))
    return t2s.load_spider_tables(found) if found else {}


def _schema_key(r: EvalRecord, schemas: dict[str, t2s.Schema], provider: t2s.DatabaseProvider) -> Optional[str]:
    """Which schema a record's SQL runs against: the CREATE TABLE statements in its prompt (what the model was
    shown) unless tables.json knows the db_id with all those tables (it adds types and keys), else tables.json."""
    text = "\n".join(m["content"] for m in r.messages)
    shown = t2s.schema_from_create_statements("prompt", text)
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


def looks_like_sql(text: str) -> bool:
    return bool(re.match(r"\s*(```(sql)?\s*)?(select|with)\b", text, re.I))


# ---------------------------------------------------------------- scoring helpers


def _normalize_text(s: str) -> str:
    return " ".join(s.split())


def eval_loss(model, tokenizer, records: Sequence[EvalRecord], style: PromptStyle,
              batch_size: int = 8, max_len: Optional[int] = None) -> tuple[float, int]:
    """Mean next-token loss over the tokens training scores: each response and the EOS after it (for raw-text
    records, every token after the first), per token over the whole file."""
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters())
    examples = []
    for r in records:
        if r.is_text:
            ids, n_prompt = render_example_ids("", r.gold, tokenizer, PromptStyle(None, "none", style.bos_id))
        else:
            ids, n_prompt = render_example_ids(r.messages, r.gold, tokenizer, style)
        if max_len:
            ids = ids[:max_len]
        labels = [-100] * min(max(n_prompt, 1), len(ids)) + ids[max(n_prompt, 1):]
        if any(t != -100 for t in labels):
            examples.append((ids, labels))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            lab = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (x, y) in enumerate(chunk):
                ids[i, :len(x)], lab[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shift = logits[:, :-1]
            target = lab[:, 1:].to(device)
            total += F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((target != -100).sum())
    return (total / count if count else float("nan")), count


def _score_sql(records: Sequence[EvalRecord], preds: Sequence[str], provider: t2s.DatabaseProvider,
               timeout_s: float, n_databases: int) -> tuple[dict, list[dict]]:
    rows = []
    sources: Counter = Counter()
    unscored: Counter = Counter()
    for r, p in zip(records, preds):
        pred_sql = t2s.extract_sql(p)
        row = {"index": r.index, "where": r.where, "db_id": r.db_id, "question": r.prompt[-300:], "gold": r.gold,
               "pred": pred_sql, "exact": t2s.exact_match(r.gold, pred_sql), "exec": None}
        real = provider.real_path(r.db_id)
        if real is not None:
            res, source = t2s.execution_match(real, r.gold, pred_sql, timeout_s=timeout_s), "real"
        elif r.schema_key:
            res = t2s.synthetic_execution_match(provider, r.schema_key, r.gold, pred_sql, n_databases=n_databases,
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
        rows.append(row)
    scored = [x for x in rows if x["exec"] is not None]
    summary = {
        "metric": "sql",
        "n": len(rows),
        "exact_match": sum(x["exact"] for x in rows) / len(rows) if rows else float("nan"),
        "execution_accuracy": sum(bool(x["exec"]) for x in scored) / len(scored) if scored else None,
        "execution_scored": len(scored),
        "execution_unscored": {k: unscored.get(k, 0) for k in ("no_database", "gold_failed", "uninformative")},
        "prediction_errors": sum(1 for x in rows if x.get("exec_note", "").startswith("prediction failed")),
        "databases": dict(sources),
    }
    if sources.get("synthetic"):
        summary["note"] = PROXY_NOTE
    return summary, rows


# ---------------------------------------------------------------- evaluate


PredictFn = Callable[[Sequence[EvalRecord]], Sequence[str]]


def evaluate(run_dir: str | Path | None, data_path: str | Path, limit: Optional[int] = None, metric: str = "auto", *,
             db_dir: str | Path | None = None, tables: str | Path | None = None, out: str | Path | None = None,
             predict_fn: Optional[PredictFn] = None, max_new_tokens: int = 128, batch_size: int = 8,
             base: str | Path | None = None, device: str = "auto", load_in_4bit: Optional[bool] = None,
             chat: Optional[bool] = None, model=None, tokenizer=None, timeout_s: float = 5.0, seed: int = 0,
             synth_dir: str | Path | None = None, n_databases: int = 3) -> dict:
    """Score the adapter in `run_dir` on `data_path`; write the per-record results and summary as JSON; return them.

    predict_fn(records) -> answers replaces generation (e.g. an oracle returning the gold SQL, or answers produced
    elsewhere); with it `run_dir` may be None for the SQL metric. Without real databases, each schema is synthesized
    with several seeds and a prediction must agree with the gold query on every one tried, until `n_databases` gave
    the gold query an informative (non-empty, non-zero) result (see text2sql.synthetic_execution_match); databases
    go to `synth_dir` (kept) or a temporary directory (deleted).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}; use one of {', '.join(METRICS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1")
    data_name = str(data_path)
    raw = read_records(data_name)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"evaluation data '{data_name}' has no records")
    records = [to_eval_record(i, rec, where) for i, (where, rec) in enumerate(raw)]

    if metric == "auto":
        sqlish = sum(looks_like_sql(r.gold) for r in records)
        metric = "sql" if sqlish * 2 > len(records) else "generic"

    info: Optional[RunInfo] = None
    if run_dir is not None:
        info = load_run(run_dir, base=base)
    elif predict_fn is None or metric != "sql":
        raise ConfigError("evaluate needs --adapter RUN_DIR (or a predict_fn for the sql metric)")

    needs_model = predict_fn is None or metric == "generic"
    if needs_model and (model is None or tokenizer is None):
        model, tokenizer = load_for_inference(run_dir, device=device, load_in_4bit=load_in_4bit, info=info)
    style = prompt_style(info, tokenizer, chat) if tokenizer is not None else None

    t0 = time.perf_counter()
    if predict_fn is not None:
        preds = [str(p) for p in predict_fn(records)]
        if len(preds) != len(records):
            raise ConfigError(f"predict_fn returned {len(preds)} answers for {len(records)} records")
    else:
        asked = [r for r in records if not r.is_text]  # raw-text records are scored by loss only
        ids = [render_prompt_ids(r.messages, tokenizer, style) for r in asked]
        outs = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
        by_index = {r.index: o for r, o in zip(asked, outs)}
        preds = [by_index.get(r.index, "") for r in records]
    gen_s = time.perf_counter() - t0

    if metric == "sql":
        schemas = _load_schemas(tables, data_name, records)
        tmp = None
        if synth_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="shardtune-dbs-")
            synth_dir = tmp.name
        try:
            provider = t2s.DatabaseProvider(synth_dir, db_dir=db_dir, schemas=schemas, seed=seed)
            for r in records:
                if provider.real_path(r.db_id) is None:
                    r.schema_key = _schema_key(r, schemas, provider)
                if r.schema_key:
                    provider.add_gold(r.schema_key, r.gold)
            summary, rows = _score_sql(records, preds, provider, timeout_s, n_databases)
        finally:
            if tmp is not None:
                tmp.cleanup()
    else:
        rows = [{"index": r.index, "prompt": r.prompt[-300:], "gold": r.gold[:300] if r.is_text else r.gold,
                 "pred": p, "exact": None if r.is_text else _normalize_text(p) == _normalize_text(r.gold)}
                for r, p in zip(records, preds)]
        asked_rows = [x for x in rows if x["exact"] is not None]
        summary = {"metric": "generic", "n": len(rows),
                   "exact_match": sum(x["exact"] for x in asked_rows) / len(asked_rows) if asked_rows else None}
        max_len = info.data_cfg.get("max_seq_len") if info else None
        loss, n_tok = eval_loss(model, tokenizer, records, style, batch_size=batch_size, max_len=max_len)
        summary.update(eval_loss=loss, perplexity=math.exp(loss) if loss == loss and loss < 50 else None,
                       loss_tokens=n_tok)

    summary.update(data=data_name, adapter=str(info.adapter_dir) if info else None,
                   predictions="predict_fn" if predict_fn is not None else "greedy generation",
                   seconds_generating=round(gen_s, 2))
    result = {"summary": summary, "records": rows}
    out_path = Path(out) if out else default_out_path(info, data_name)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out_path.with_name(out_path.name + ".tmp")
        tmp_out.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp_out, out_path)
        summary["out"] = str(out_path)
    return result


def default_out_path(info: Optional[RunInfo], data_name: str) -> Optional[Path]:
    if info is None:
        return None
    where = info.run_dir or info.adapter_dir
    stem = Path(data_name.split(":", 1)[1] if data_name.startswith("builtin:") else data_name).stem
    return where / "eval" / f"{stem}.json"


def format_summary(summary: dict) -> str:
    lines = [f"evaluated {summary['n']} records of {summary.get('data')} ({summary['metric']} metric)"]
    if summary["metric"] == "sql":
        lines.append(f"  exact match (normalized SQL): {summary['exact_match']:.3f}")
        ea = summary["execution_accuracy"]
        unscored = summary["execution_unscored"]
        db = ", ".join(f"{k} {v}" for k, v in summary["databases"].items()) or "none"
        lines.append(f"  execution accuracy: {'n/a' if ea is None else f'{ea:.3f}'} over {summary['execution_scored']}"
                     f" records (databases: {db}; unscored: {unscored['no_database']} without a schema, "
                     f"{unscored['gold_failed']} whose gold query fails, {unscored['uninformative']} whose gold "
                     f"result is empty on every synthesized database)")
        if summary.get("note"):
            lines.append(f"  note: {summary['note']}")
    else:
        em = summary.get("exact_match")
        lines.append(f"  eval loss {summary['eval_loss']:.4f} (perplexity "
                     f"{summary['perplexity'] if summary['perplexity'] is None else round(summary['perplexity'], 3)}) "
                     f"over {summary['loss_tokens']} tokens; exact match {'n/a' if em is None else f'{em:.3f}'}")
    if summary.get("out"):
        lines.append(f"  per-record results: {summary['out']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Score a trained adapter: text-to-SQL exact match and execution accuracy, or eval loss, "
                          "perplexity and exact match for other data.")
    parser.add_argument("--adapter", required=True, metavar="RUN_DIR",
                        help="training run directory (output.dir) or a PEFT adapter directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSON / JSONL records with gold answers")
    parser.add_argument("--db-dir", metavar="DIR", help="real SQLite databases as DIR/<db_id>/<db_id>.sqlite")
    parser.add_argument("--tables", metavar="FILE",
                        help="Spider tables.json for synthesized databases (default: *tables*.json beside --data)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N records")
    parser.add_argument("--n-databases", type=int, default=3, metavar="K",
                        help="synthesized databases on which the gold query must give an informative result; the "
                             "prediction must match it on all of them (default 3)")
    parser.add_argument("--keep-dbs", metavar="DIR", help="write the synthesized databases here (default: temporary)")
    parser.add_argument("--metric", default="auto", choices=METRICS)
    parser.add_argument("--out", metavar="FILE", help="results JSON (default: RUN_DIR/eval/<data name>.json)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base", metavar="DIR", help="base model directory, when the recorded one moved")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", default=None,
                        help="load a qlora run's base unquantized")


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.adapter, args.data, limit=args.limit, metric=args.metric, db_dir=args.db_dir,
                      tables=args.tables, out=args.out, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, base=args.base, device=args.device, load_in_4bit=args.load_in_4bit,
                      n_databases=args.n_databases, synth_dir=args.keep_dbs)
    print(format_summary(result["summary"]))
    return 0
