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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from shardtune.errors import ConfigError, DataError
from shardtune.export import text2sql as t2s
from shardtune.export.adapter import RunInfo, load_for_inference, load_run
from shardtune.export.generate import generate_ids, render_example_ids, render_prompt_ids, uses_chat

METRICS = ("auto", "sql", "generic")
PROXY_NOTE = ("execution accuracy on synthesized databases (schema from tables.json or the prompt's CREATE TABLE "
              "statements, seeded rows, several seeds per schema) is a proxy in the spirit of test-suite accuracy, not the official Spider "
              "number; pass --db-dir with the real <db_id>/<db_id>.sqlite files for that")


@dataclass
class EvalRecord:
    """One scored example: the conversation up to the answer, the gold answer, and for SQL where to run it."""

    index: int
    messages: list[dict]
    gold: str
    db_id: Optional[str] = None
    schema_key: Optional[str] = None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


# ---------------------------------------------------------------- reading records


def read_records(path: str | Path) -> list[dict]:
    """JSON (a list of records, or an object with a data/records/examples list) or JSON Lines."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"evaluation data '{path}' not found; pass --data with a JSON or JSONL file")
    if p.suffix not in (".json", ".jsonl"):
        raise DataError(f"evaluation data '{path}' must be .json or .jsonl")
    text = p.read_text(encoding="utf-8")
    data = None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in e.msg:  # anything else is a broken file; Extra data means JSON Lines
                raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if data is None:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
    if isinstance(data, dict):
        wrapped = [data[k] for k in ("data", "records", "examples", "rows") if isinstance(data.get(k), list)]
        data = wrapped[0] if wrapped else [data]
    if not isinstance(data, list):
        raise DataError(f"'{path}' must hold a list of records")
    return data


_DB_ID_IN_TEXT = re.compile(r"^\s*(\w+) contains tables such as", re.I)  # DB-GPT-Hub's Spider instructions
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "model": "assistant", "bot": "assistant"}


def _conversation(turns: list) -> tuple[list[dict], str]:
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            raise DataError("a messages/conversations entry is not an object")
        role = _ROLE.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or content is None:
            raise DataError(f"conversation turn {t!r} has no role/from or content/value")
        msgs.append({"role": role, "content": str(content)})
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        return msgs, ""
    return msgs[:last], msgs[last]["content"]


def to_eval_record(i: int, rec: dict, schemas: dict[str, t2s.Schema]) -> EvalRecord:
    """Map one record of any supported format to (conversation, gold answer, db_id).

    Prompts are built the way shardtune.data renders the same formats for training (alpaca: instruction, a blank
    line, input; Spider-style question + db_id: the schema as CREATE TABLE statements, a blank line, the question).
    """
    if not isinstance(rec, dict):
        raise DataError(f"record {i} is not a JSON object")
    db_id = rec.get("db_id")
    if "messages" in rec or "conversations" in rec:
        msgs, gold = _conversation(rec.get("messages") or rec.get("conversations") or [])
    elif "instruction" in rec:
        instr, inp = str(rec.get("instruction") or ""), str(rec.get("input") or "")
        msgs = [{"role": "user", "content": f"{instr}\n\n{inp}" if inp else instr}]
        gold = str(rec.get("output", rec.get("response", "")))
        if db_id is None:
            m = _DB_ID_IN_TEXT.match(instr)
            db_id = m.group(1) if m else None
    elif "prompt" in rec and ("completion" in rec or "response" in rec):
        msgs = [{"role": "user", "content": str(rec["prompt"])}]
        gold = str(rec.get("completion", rec.get("response", "")))
    elif "question" in rec and any(k in rec for k in ("query", "sql", "answer")):
        question = str(rec["question"])
        schema_text = rec.get("schema") or rec.get("context") or rec.get("db_schema")
        if not schema_text and db_id in schemas:
            schema_text = schema_as_text(schemas[db_id])
        content = f"{schema_text}\n\n{question}" if schema_text else question
        msgs = [{"role": "user", "content": content}]
        gold = str(rec.get("query", rec.get("sql", rec.get("answer"))))
    elif "text" in rec:
        msgs, gold = [{"role": "user", "content": str(rec["text"])}], ""
    else:
        raise DataError(f"record {i} has keys {sorted(rec)[:8]}; expected alpaca (instruction/input/output), "
                        f"messages, prompt/completion, question/query (+db_id) or text")
    return EvalRecord(index=i, messages=msgs, gold=gold.strip(), db_id=str(db_id) if db_id is not None else None,
                      raw=rec)


def schema_as_text(schema: t2s.Schema) -> str:
    """CREATE TABLE statements for a schema (for Spider-style records that carry only a db_id)."""
    parts = []
    for t in schema.tables:
        cols = [f"  {c.name} {t2s._sql_type(c)}" for c in t.columns]
        if t.primary_key:
            cols.append(f"  PRIMARY KEY ({', '.join(t.primary_key)})")
        for (st, sc), (dt, dc) in schema.foreign_keys:
            if st == t.name:
                cols.append(f"  FOREIGN KEY ({sc}) REFERENCES {dt}({dc})")
        parts.append(f"CREATE TABLE {t.name} (\n" + ",\n".join(cols) + "\n)")
    return "\n\n".join(parts)


def find_tables_file(data_path: Path) -> Optional[Path]:
    """Spider keeps tables.json next to dev.json; DB-GPT-Hub-style copies name it *tables*.json."""
    d = data_path.parent
    for name in ("tables.json", "spider_tables.json"):
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*tables*.json"))
    return found[0] if found else None


def looks_like_sql(text: str) -> bool:
    return bool(re.match(r"\s*(```(sql)?\s*)?(select|with)\b", text, re.I))


# ---------------------------------------------------------------- scoring helpers


def _normalize_text(s: str) -> str:
    return " ".join(s.split())


def eval_loss(model, tokenizer, records: Sequence[EvalRecord], chat: bool, data_cfg: dict,
              batch_size: int = 8, max_len: Optional[int] = None) -> tuple[float, int]:
    """Mean next-token loss over the response tokens of every record (all tokens for raw-text records)."""
    import torch
    import torch.nn.functional as F

    device = next(p.device for p in model.parameters())
    examples = []
    for r in records:
        if r.gold:
            ids, n_prompt = render_example_ids(r.messages, r.gold, tokenizer, chat, data_cfg)
        else:  # raw text: every token is a target
            ids, n_prompt = list(tokenizer(r.prompt)["input_ids"]), 0
        if max_len:
            ids = ids[:max_len]
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if sum(1 for t in labels[1:] if t != -100):
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
               timeout_s: float) -> tuple[dict, list[dict]]:
    rows = []
    sources: Counter = Counter()
    for r, p in zip(records, preds):
        pred_sql = t2s.extract_sql(p)
        row = {"index": r.index, "db_id": r.db_id, "question": r.prompt[-300:], "gold": r.gold, "pred": pred_sql,
               "exact": t2s.exact_match(r.gold, pred_sql), "exec": None}
        dbs, source = provider.paths_for(r.db_id, r.schema_key)
        if not dbs:
            row["exec_note"] = "no database or schema for this record"
        else:
            res = t2s.execution_match_all(dbs, r.gold, pred_sql, timeout_s=timeout_s)
            row["exec"], row["db"] = res.match, source
            sources[source] += 1
            if res.gold_error:
                row["exec_note"] = f"gold query failed: {res.gold_error}"
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
        "execution_unscored": {
            "no_database": sum(1 for x in rows if x.get("exec_note", "").startswith("no database")),
            "gold_failed": sum(1 for x in rows if x.get("exec_note", "").startswith("gold query failed")),
        },
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
    `n_databases` times with different seeds and a prediction must agree with the gold query on all of them; they go
    to `synth_dir` (kept) or a temporary directory (deleted).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}; use one of {', '.join(METRICS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1")
    data_path = Path(data_path)
    raw = read_records(data_path)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"evaluation data '{data_path}' has no records")

    tables_path = Path(tables) if tables else find_tables_file(data_path)
    if tables and not tables_path.is_file():
        raise DataError(f"tables file '{tables}' not found; pass --tables with Spider's tables.json")
    need_tables = any(isinstance(r, dict) and "db_id" in r for r in raw) or any(
        isinstance(r, dict) and _DB_ID_IN_TEXT.match(str(r.get("instruction", ""))) for r in raw)
    schemas = t2s.load_spider_tables(tables_path) if (tables_path and need_tables) else {}
    records = [to_eval_record(i, r, schemas) for i, r in enumerate(raw)]

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
    data_cfg = info.data_cfg if info else {}
    use_chat = (uses_chat(info, tokenizer) if chat is None else chat) if tokenizer is not None else False

    t0 = time.perf_counter()
    if predict_fn is not None:
        preds = [str(p) for p in predict_fn(records)]
        if len(preds) != len(records):
            raise ConfigError(f"predict_fn returned {len(preds)} answers for {len(records)} records")
    else:
        ids = [render_prompt_ids(r.messages, tokenizer, use_chat, data_cfg) for r in records]
        preds = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    gen_s = time.perf_counter() - t0

    if metric == "sql":
        tmp = None
        if synth_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="shardtune-dbs-")
            synth_dir = tmp.name
        try:
            provider = t2s.DatabaseProvider(synth_dir, db_dir=db_dir, schemas=schemas, seed=seed,
                                            n_databases=n_databases)
            for r in records:
                key = r.db_id if r.db_id in schemas else None
                if key is None and provider.real_path(r.db_id) is None:
                    # No tables.json entry: a schema written as CREATE TABLE statements in the prompt, per record.
                    text = "\n".join(m["content"] for m in r.messages)
                    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
                    schema = t2s.schema_from_create_statements(f"{r.db_id or 'db'}-{digest}", text)
                    if schema is not None:
                        key = schema.db_id
                        provider.add_schema(key, schema)
                r.schema_key = key
                if key:
                    provider.add_gold(key, r.gold)
            summary, rows = _score_sql(records, preds, provider, timeout_s)
        finally:
            if tmp is not None:
                tmp.cleanup()
    else:
        rows = [{"index": r.index, "prompt": r.prompt[-300:], "gold": r.gold, "pred": p,
                 "exact": bool(r.gold) and _normalize_text(p) == _normalize_text(r.gold)}
                for r, p in zip(records, preds)]
        with_gold = [x for x in rows if x["gold"]]
        summary = {"metric": "generic", "n": len(rows),
                   "exact_match": sum(x["exact"] for x in with_gold) / len(with_gold) if with_gold else None}
        max_len = (info.data_cfg.get("max_seq_len") if info else None)
        loss, n_tok = eval_loss(model, tokenizer, records, use_chat, data_cfg, batch_size=batch_size, max_len=max_len)
        summary.update(eval_loss=loss, perplexity=math.exp(loss) if loss == loss and loss < 50 else None,
                       loss_tokens=n_tok)

    summary.update(data=str(data_path), adapter=str(info.adapter_dir) if info else None,
                   predictions="predict_fn" if predict_fn is not None else "greedy generation",
                   seconds_generating=round(gen_s, 2))
    result = {"summary": summary, "records": rows}
    out_path = Path(out) if out else default_out_path(info, data_path)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out_path.with_name(out_path.name + ".tmp")
        tmp_out.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp_out, out_path)
        summary["out"] = str(out_path)
    return result


def default_out_path(info: Optional[RunInfo], data_path: Path) -> Optional[Path]:
    if info is None:
        return None
    where = info.run_dir or info.adapter_dir
    return where / "eval" / f"{data_path.stem}.json"


def format_summary(summary: dict) -> str:
    lines = [f"evaluated {summary['n']} records of {summary.get('data')} ({summary['metric']} metric)"]
    if summary["metric"] == "sql":
        lines.append(f"  exact match (normalized SQL): {summary['exact_match']:.3f}")
        ea = summary["execution_accuracy"]
        unscored = summary["execution_unscored"]
        db = ", ".join(f"{k} {v}" for k, v in summary["databases"].items()) or "none"
        lines.append(f"  execution accuracy: {'n/a' if ea is None else f'{ea:.3f}'} over {summary['execution_scored']}"
                     f" records (databases: {db}; unscored: {unscored['no_database']} without a schema, "
                     f"{unscored['gold_failed']} whose gold query fails)")
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
                        help="synthesized databases per schema; a prediction must match gold on all K (default 3)")
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
