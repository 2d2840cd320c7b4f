"""The bundled toy text-to-SQL set, and the real published text-to-SQL files in ../shared/data (skipped without them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from data_helpers import data_cfg, prompt_text, target_text

from shardtune.config import BUILTIN_DATA as CONFIG_BUILTIN_DATA
from shardtune.data.formats import detect_format
from shardtune.data.pipeline import build_datasets
from shardtune.builtin.toy_sql import BUILTIN_DATA, TABLES, builtin_corpus, toy_sql_records

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text2sql"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present (published data not checked out)")


def test_toy_sql_is_deterministic_and_sized():
    a, b = toy_sql_records(), toy_sql_records()
    assert a == b and 400 <= len(a) <= 1500
    assert builtin_corpus() == builtin_corpus()
    assert BUILTIN_DATA == CONFIG_BUILTIN_DATA
    assert len({(r["input"], r["output"]) for r in a}) == len(a)  # no duplicates
    assert {detect_format(r) for r in a} == {"text2sql"}
    assert set(a[0]) == {"db_id", "instruction", "input", "output", "history"}  # DB-GPT-Hub record shape
    for r in a:
        tables = set(re.findall(r"(?:FROM|JOIN) (\w+)", r["output"]))
        assert tables and tables <= set(TABLES), r["output"]


def test_toy_sql_fits_the_builtin_tokenizer():
    """Rendered with the built-in model's tokenizer (768-entry byte BPE trained on builtin_corpus), every sample is
    short, and the corpus covers the ChatML markers and the SQL so they are not spelled out byte by byte."""
    from shardtune.builtin.tiny_model import build_tokenizer

    tok = build_tokenizer(builtin_corpus(), vocab_size=768)
    s = build_datasets(data_cfg(BUILTIN_DATA, max_seq_len=256, val_fraction=0.1), tok, 42)
    assert s.stats["format"] == "text2sql" and s.stats["truncated"] == 0 and s.stats["bad_lines"] == 0
    assert len(s.val) >= 40 and len(s.train) + len(s.val) == len(toy_sql_records())
    lengths = [len(x["input_ids"]) for x in s.train + s.val]
    assert max(lengths) <= 128
    first = s.train[0]
    assert prompt_text(tok, first).startswith("<|im_start|>user\n")
    # most records carry the schema (each trained question also comes once without it, as `generate` is typed)
    with_schema = sum(prompt_text(tok, x).startswith("<|im_start|>user\nCREATE TABLE singer") for x in s.train)
    assert len(s.train) // 2 < with_schema < len(s.train)
    assert target_text(tok, first).startswith("SELECT ") and target_text(tok, first).endswith("<|im_end|>\n</s>")
    assert tok.tokenize("SELECT count(*) FROM singer WHERE")[:1] == ["SELECT"]


def test_builtin_corpus_matches_pipeline_rendering(tok):
    """The tokenizer is trained on the exact text the pipeline produces for the toy set (ChatML + EOS)."""
    s = build_datasets(data_cfg(BUILTIN_DATA, max_samples=5, chat_template="chatml"), tok, 0)
    rendered = {tok.decode(x["input_ids"]) for x in s.train}
    assert rendered <= set(builtin_corpus())


@needs_shared
def test_dbgpt_hub_example_records(tok):
    path = SHARED / "example_text2sql.json"
    recs = json.loads(path.read_text())
    s = build_datasets(data_cfg(path, max_seq_len=8192), tok, 0)
    assert s.stats["format"] == "text2sql" and s.stats["records_used"] == len(recs) == 217
    assert s.stats["bad_lines"] == 0 and not s.stats["skipped"] and s.stats["truncated"] == 0
    # training order is shuffled: find each sample's record by its answer and check the masking against it
    prompts_by_answer: dict[str, set] = {}
    for r in recs:
        prompts_by_answer.setdefault(r["output"], set()).add(
            f"<|im_start|>user\n{r['instruction']}<|im_end|>\n<|im_start|>assistant\n")
    for x in s.train[:30]:
        answer = target_text(tok, x).removesuffix("<|im_end|>\n</s>")
        assert prompt_text(tok, x) in prompts_by_answer[answer]


@needs_shared
def test_spider_dev_alpaca_records(tok):
    path = SHARED / "spider_dev_alpaca.json"
    s = build_datasets(data_cfg(path, max_seq_len=8192, val_fraction=0.05), tok, 0)
    assert s.stats["format"] == "alpaca" and s.stats["records_used"] == 1034
    assert len(s.val) == round(1034 * 0.05) and s.stats["bad_lines"] == 0
    x = s.val[0]
    assert "contains tables such as" in prompt_text(tok, x)
    assert target_text(tok, x).lower().startswith("select")
