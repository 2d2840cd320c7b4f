"""evaluate() end to end: a tiny adapter, an oracle and a wrong predictor, generic loss, real Spider-format files."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from shardtune.errors import ConfigError, DataError
from shardtune.eval import evaluate as ev_mod
from shardtune.eval.evaluate import evaluate
from shardtune.eval.records import read_records, to_eval_record
from shardtune.eval.report import format_summary
from shardtune.export.adapter import load_for_inference
from shardtune.export.generate import render_example_ids

from sql_examples import SCHEMA_ENTRY, SHARED_DATA, oracle


def test_oracle_scores_one_and_a_wrong_predictor_zero(tiny_run, sql_file, tmp_path):
    res = evaluate(tiny_run.run_dir, sql_file, predict_fn=oracle, out=tmp_path / "o.json")
    s = res["summary"]
    assert s["metric"] == "sql" and s["n"] == 3
    assert s["exact_match"] == 1.0 and s["execution_accuracy"] == 1.0 and s["execution_scored"] == 3
    assert s["databases"] == {"synthetic": 3} and "proxy" in s["note"]
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["summary"]["execution_accuracy"] == 1.0 and len(saved["records"]) == 3

    # right result, different text: execution accuracy counts it, exact match does not
    rewritten = ["SELECT s.name FROM singer AS s WHERE NOT s.age <= 30",
                 "SELECT COUNT(singer_id) FROM singer WHERE 'France' = country",
                 "SELECT year, count(*) FROM concert GROUP BY 1"]
    s = evaluate(tiny_run.run_dir, sql_file, predict_fn=lambda recs: rewritten, out=tmp_path / "r.json")["summary"]
    assert s["exact_match"] == 0.0 and s["execution_accuracy"] == 1.0

    wrong = ["SELECT name FROM singer WHERE age < 30", "SELECT count(*) FROM singer", "SELECT year FROM concert"]
    s = evaluate(tiny_run.run_dir, sql_file, predict_fn=lambda recs: wrong, out=tmp_path / "w.json")["summary"]
    assert s["exact_match"] == 0.0 and s["execution_accuracy"] == 0.0


def test_real_model_end_to_end(tiny_run, sql_file, tmp_path):
    res = evaluate(tiny_run.run_dir, sql_file, max_new_tokens=16, device="cpu")
    s = res["summary"]
    assert s["n"] == 3 and s["predictions"] == "greedy generation"
    assert 0.0 <= s["exact_match"] <= 1.0 and s["execution_scored"] + s["execution_unscored"]["no_database"] == 3
    out = tiny_run.run_dir / "eval" / "dev.json"  # default location
    assert s["out"] == str(out) and out.is_file()
    assert all(isinstance(r["pred"], str) for r in res["records"])
    assert "exact match" in format_summary(s)


def test_limit_and_real_database_dir(tiny_run, sql_file, tmp_path):
    from shardtune.eval.text2sql.synth import build_database, schema_from_spider

    # a "real" database under --db-dir takes precedence over synthesis
    db_dir = tmp_path / "dbs"
    build_database(schema_from_spider(SCHEMA_ENTRY), db_dir / "music" / "music.sqlite", seed=7)
    s = evaluate(tiny_run.run_dir, sql_file, predict_fn=oracle, db_dir=db_dir, limit=2,
                 out=tmp_path / "x.json")["summary"]
    assert s["n"] == 2 and s["databases"] == {"real": 2} and "note" not in s


def test_generic_loss_matches_a_direct_computation(tiny_run, tmp_path):
    recs = [{"instruction": "Say hi", "input": "", "output": "hi there"},
            {"instruction": "Count", "input": "1 2", "output": "3 4 5"}]
    p = tmp_path / "chat.json"
    p.write_text(json.dumps(recs))
    model, tok = load_for_inference(tiny_run.run_dir, device="cpu")
    res = evaluate(tiny_run.run_dir, p, model=model, tokenizer=tok, max_new_tokens=4, out=tmp_path / "g.json")
    s = res["summary"]
    assert s["metric"] == "generic" and s["exact_match"] == 0.0

    # reference: one sequence at a time, no padding, loss on the answer tokens (and the EOS after them) only
    from shardtune.export.adapter import load_run
    from shardtune.export.generate import prompt_style

    style = prompt_style(load_run(tiny_run.run_dir), tok)
    total, count = 0.0, 0
    for i, r in enumerate(recs):
        er = to_eval_record(i, r)
        ids, n_prompt = render_example_ids(er.messages, er.gold, tok, style)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        for pos in range(n_prompt, len(ids)):
            total -= logp[pos - 1, ids[pos]].item()
            count += 1
    assert s["loss_tokens"] == count
    assert s["eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert s["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_record_formats_and_errors(tmp_path):
    r = to_eval_record(0, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    assert r.messages == [{"role": "user", "content": "q"}] and r.gold == "a"
    r = to_eval_record(0, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert r.messages[0]["role"] == "user" and r.gold == "a"
    r = to_eval_record(0, {"instruction": "concert_singer contains tables such as singer.", "input": "How many?",
                           "output": "SELECT count(*) FROM singer"})
    assert r.db_id == "concert_singer" and r.prompt.endswith("\n\nHow many?")
    r = to_eval_record(0, {"text": "just text"})
    assert r.is_text and r.gold == "just text"
    with pytest.raises(DataError, match="x.json:3: cannot detect"):
        to_eval_record(3, {"foo": 1}, "x.json:3")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        read_records(bad)
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.json")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="needs --adapter"):
        evaluate(None, good, metric="generic")


@pytest.mark.skipif(not (SHARED_DATA / "text2sql" / "spider_dev.json").is_file(), reason="shared data not present")
@pytest.mark.parametrize("name", ["spider_dev.json", "spider_dev_alpaca.json", "example_text2sql.json"])
def test_shared_text2sql_files_with_an_oracle(name, tmp_path):
    # Spider's own format and DB-GPT-Hub's two exports: every record finds a schema (tables.json beside the file, the
    # db_id named in the instruction, or CREATE TABLE statements in the prompt) and the gold SQL scores itself 1.0
    path = SHARED_DATA / "text2sql" / name
    s = evaluate(None, path, predict_fn=oracle, limit=25, out=tmp_path / "o.json")["summary"]
    assert s["n"] == 25 and s["exact_match"] == 1.0 and s["execution_accuracy"] == 1.0
    assert s["execution_unscored"]["no_database"] == 0
    assert s["execution_scored"] + sum(s["execution_unscored"].values()) == 25 and s["execution_scored"] >= 15
    # which records are scored depends on the gold queries only: a wrong predictor has the same denominator
    w = evaluate(None, path, predict_fn=lambda recs: ["SELECT 1"] * len(recs), limit=25, out=tmp_path / "w.json")
    assert w["summary"]["execution_scored"] == s["execution_scored"] and w["summary"]["execution_accuracy"] == 0.0


def test_cli_evaluate(tiny_run, sql_file, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ev_mod.add_arguments(parser)
    args = parser.parse_args(["--adapter", str(tiny_run.run_dir), "--data", str(sql_file), "--limit", "1",
                              "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "cli.json")])
    assert ev_mod.run(args) == 0
    out = capsys.readouterr().out
    assert "execution accuracy" in out and "prediction errors:" in out
    saved = json.loads((tmp_path / "cli.json").read_text())
    assert saved["summary"]["n"] == 1
    # the worst-failures table is printed exactly when a record failed (the untrained model's 4 tokens usually do)
    failed = [r for r in saved["records"] if r["status"] not in ("correct", "unscored")]
    assert ("worst 1 of 1 failures" in out) == bool(failed)
