"""The built-in tiny Llama ships pretrained (shardtune/assets/tiny-llama): it loads, matches the hashes recorded when it
was built, copies values as its manifest says, refuses a changed file, and the script that built it still runs and is
deterministic."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.builtin import pretrain_base
from shardtune.builtin.copy_corpus import copy_line, filler_words, value_words
from shardtune.builtin.pretrain_base import MANIFEST, build_base, file_hashes, probe_copy_rate
from shardtune.builtin.tiny_model import BUILTIN_SHAPE, builtin_model_dir
from shardtune.builtin.toy_sql import toy_sql_records
from shardtune.errors import ModelError


def test_shipped_base_loads_and_matches_its_recorded_hashes():
    d = builtin_model_dir()
    manifest = json.loads((d / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["sha256"])
    assert file_hashes(d) == manifest["sha256"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == tuple(BUILTIN_SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                              "num_attention_heads", "num_key_value_heads",
                                                              "vocab_size"))
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    assert len(tok) <= c.vocab_size and tok.chat_template
    # word tokens: a value is one token in the question and one after the SQL's quote
    assert tok.tokenize(" from France?") == ["Ġfrom", "ĠFrance", "?"]
    assert tok.tokenize(" = 'France'") == ["Ġ=", "Ġ'", "France", "'"]
    # it copies: fresh lines, exact greedy copies, about as often as when it was built (another sample of lines)
    fillers, values = filler_words(tok.get_vocab()), value_words()
    rate = probe_copy_rate(model, tok, fillers, values, lines=60, seed=1234)
    assert rate >= manifest["probe_copy_rate"] - 0.15 and rate >= 0.6, rate


def test_a_changed_base_file_is_a_one_line_error(tmp_path, monkeypatch):
    copy = tmp_path / "tiny-llama"
    shutil.copytree(builtin_model_dir(), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(pretrain_base, "ASSET_DIR", copy)
    with pytest.raises(ModelError, match=r"model\.safetensors .*python -m shardtune\.builtin\.pretrain_base") as e:
        builtin_model_dir()
    assert "\n" not in str(e.value)
    (copy / MANIFEST).unlink()
    with pytest.raises(ModelError, match="base.json is missing"):
        builtin_model_dir()


def test_copying_lines_are_generic_not_the_toy_task():
    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    fillers, values = filler_words(tok.get_vocab()), value_words()
    rng = random.Random(0)
    lines = [copy_line(rng, fillers, values) for _ in range(2000)]
    texts = [prefix + target for prefix, target in lines]
    texts = set(texts)
    records = toy_sql_records() + toy_sql_records(heldout=True)
    assert not texts & ({r["input"] for r in records} | {r["output"] for r in records})
    assert not {w for v in values for w in v.split()} & set(fillers)  # what is copied is never filler
    for prefix, target in lines[:200]:  # the target repeats values of the prefix, in order
        copied = [v.strip(" '") for v in target.replace(" AND", ",").replace(" and", ",").replace(" ,", ",").split(",")
                  if v.strip()]
        assert all(v in prefix for v in copied), (prefix, target)


def test_pretraining_script_runs_and_is_deterministic(tmp_path):
    a = build_base(tmp_path / "a", steps=2, rows_per_step=4, probe_lines=5, log_every=1)
    b = build_base(tmp_path / "b", steps=2, rows_per_step=4, probe_lines=5, log_every=1)
    assert a["sha256"] == b["sha256"] == file_hashes(tmp_path / "a")
    assert a["sha256"]["tokenizer.json"] == json.loads((builtin_model_dir() / MANIFEST).read_text())["sha256"][
        "tokenizer.json"]  # the shipped tokenizer is the one the script builds
    with pytest.raises(ValueError, match="holds files but no base.json"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "notes.txt").write_text("mine")
        build_base(tmp_path / "c", steps=1)
