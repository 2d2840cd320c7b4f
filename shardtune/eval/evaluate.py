"""`shardtune evaluate`: score a trained adapter on a data file, write every record's result as JSON, print a summary
and the worst failures.

Text-to-SQL data (gold answers that are SQL) gets normalized exact match and execution accuracy on SQLite databases
(real ones from --db-dir, every record's; else synthesized from the schemas: a proxy, see eval/text2sql/synth.py),
every statement run through the read-only sandbox (eval/text2sql/sandbox.py). Other data gets eval loss / perplexity
on the response tokens and exact match of greedy generations (eval/generic.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from shardtune.builtin.toy_sql import scored_split
from shardtune.errors import ConfigError, DataError
from shardtune.eval.records import EvalRecord, looks_like_sql, read_records, to_eval_record
from shardtune.eval.report import format_summary, format_worst
from shardtune.eval.text2sql import score as t2s_score
from shardtune.eval.text2sql.synth import DatabaseProvider
from shardtune.export.adapter import RunInfo, load_for_inference, load_run
from shardtune.export.generate import generate_ids, prompt_style, render_prompt_ids

METRICS = ("auto", "sql", "generic")

PredictFn = Callable[[Sequence[EvalRecord]], Sequence[str]]


def evaluate(run_dir: str | Path | None, data_path: str | Path, limit: Optional[int] = None, metric: str = "auto", *,
             db_dir: str | Path | None = None, tables: str | Path | None = None, out: str | Path | None = None,
             predict_fn: Optional[PredictFn] = None, max_new_tokens: int = 128, batch_size: int = 8,
             base: str | Path | None = None, device: str = "auto", load_in_4bit: Optional[bool] = None,
             chat: Optional[bool] = None, model=None, tokenizer=None, timeout_s: float = 5.0, seed: int = 0,
             synth_dir: str | Path | None = None, n_databases: int = 3) -> dict:
    """Score the adapter in `run_dir` on `data_path`; write the per-record results and summary as JSON; return them.

    predict_fn(records) -> answers replaces generation (e.g. an oracle returning the gold SQL, or answers produced
    elsewhere); with it `run_dir` may be None for the SQL metric. `db_dir` must hold every record's database (checked
    before any model is loaded). Without it, each schema is synthesized with several seeds and a prediction must agree
    with the gold query on every one tried, until `n_databases` gave the gold query an informative (non-empty,
    non-zero) result (see text2sql.execute.synthetic_execution_match); databases go to `synth_dir` (kept) or a
    temporary directory (deleted).
    """
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}; use one of {', '.join(METRICS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: must be >= 1")
    data_name = scored_split(str(data_path))  # builtin:toy-sql -> its held-out split
    raw = read_records(data_name)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise DataError(f"evaluation data '{data_name}' has no records")
    records = [to_eval_record(i, rec, where) for i, (where, rec) in enumerate(raw)]

    if metric == "auto":
        sqlish = sum(looks_like_sql(r.gold) for r in records)
        metric = "sql" if sqlish * 2 > len(records) else "generic"
    if db_dir is not None:
        if metric != "sql":
            raise ConfigError(f"--db-dir is for text-to-SQL data, but '{data_name}' is scored with the generic metric "
                              "(most gold answers are not SELECT/WITH queries); drop --db-dir or pass --metric sql")
        t2s_score.check_db_dir(db_dir, records)

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
        summary, rows = _score_sql(records, preds, data_name, tables=tables, db_dir=db_dir, synth_dir=synth_dir,
                                   seed=seed, timeout_s=timeout_s, n_databases=n_databases)
    else:
        from shardtune.eval.generic import score_generic

        max_len = info.data_cfg.get("max_seq_len") if info else None
        summary, rows = score_generic(records, preds, model, tokenizer, style, batch_size=batch_size, max_len=max_len)

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


def _score_sql(records: Sequence[EvalRecord], preds: Sequence[str], data_name: str, *, tables, db_dir, synth_dir,
               seed: int, timeout_s: float, n_databases: int) -> tuple[dict, list[dict]]:
    schemas = t2s_score.load_schemas(tables, data_name, records)
    tmp = None
    if synth_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="shardtune-dbs-")
        synth_dir = tmp.name
    try:
        provider = DatabaseProvider(synth_dir, db_dir=db_dir, schemas=schemas, seed=seed)
        t2s_score.prepare(records, provider, schemas)
        return t2s_score.score_sql(records, preds, provider, timeout_s, n_databases)
    finally:
        if tmp is not None:
            tmp.cleanup()


def default_out_path(info: Optional[RunInfo], data_name: str) -> Optional[Path]:
    if info is None:
        return None
    where = info.run_dir or info.adapter_dir
    stem = Path(data_name.split(":", 1)[1] if data_name.startswith("builtin:") else data_name).stem
    return where / "eval" / f"{stem}.json"


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Score a trained adapter: text-to-SQL exact match and execution accuracy, or eval loss, "
                          "perplexity and exact match for other data.")
    parser.add_argument("--adapter", required=True, metavar="RUN_DIR",
                        help="training run directory (output.dir) or a PEFT adapter directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSON / JSONL records with gold answers")
    parser.add_argument("--db-dir", metavar="DIR",
                        help="real SQLite databases as DIR/<db_id>/<db_id>.sqlite; every record's must be there")
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
    worst = format_worst(result["records"], out=result["summary"].get("out"))
    if worst:
        print(worst)
    return 0
