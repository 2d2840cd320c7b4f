"""Generation renders prompts like training and decodes greedily, one prompt or a padded batch."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from shardtune.export import generate as gen_mod
from shardtune.export.adapter import load_for_inference, load_run
from shardtune.export.generate import (generate, prompt_style, render_example_ids, render_prompt_ids,
                                       stop_token_ids)
from shardtune.builtin.templates import CHATML_TEMPLATE


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_for_inference(tiny_run.run_dir, device="cpu")


def _greedy_reference(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """Token-by-token argmax with full recomputation: the slowest, plainest decoder."""
    seq, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in stops:
                break
            seq.append(nxt)
            new.append(nxt)
    return new


def test_chat_runs_wrap_prompts_in_the_template(tiny_run, run_copy, loaded):
    _, tok = loaded
    style = prompt_style(load_run(tiny_run.run_dir), tok)  # alpaca data -> the tokenizer's chat template
    assert style.chat
    text = tok.decode(render_prompt_ids("How many singers?", tok, style))
    assert text.startswith("<|im_start|>user\nHow many singers?<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    raw = prompt_style(load_run(run_copy(data_format="text")), tok)  # raw text data -> raw
    assert not raw.chat
    assert render_prompt_ids("How many singers?", tok, raw) == tok("How many singers?", add_special_tokens=False)[
        "input_ids"]
    assert not prompt_style(load_run(tiny_run.run_dir), tok, chat=False).chat


def test_tokenizer_without_template_falls_back_to_chatml(tiny_run, loaded):
    _, tok = loaded
    saved, tok.chat_template = tok.chat_template, None
    try:
        style = prompt_style(load_run(tiny_run.run_dir), tok)
        ids = render_prompt_ids("hi", tok, style)
    finally:
        tok.chat_template = saved
    assert style.name == "chatml"
    want = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=CHATML_TEMPLATE,
                                   add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(want)


def test_prompts_and_samples_equal_what_training_builds(tiny_run, loaded, tmp_path):
    """The ids generate/evaluate use are the training pipeline's own: prompt = the masked prefix of a sample."""
    from shardtune.config import DataConfig
    from shardtune.data.formats import prompt_and_answer
    from shardtune.data.pipeline import build_datasets

    _, tok = loaded
    rec = {"instruction": "CREATE TABLE singer (name, age)", "input": "Who is older than 30?",
           "output": "SELECT name FROM singer WHERE age > 30", "history": [["How many?", "SELECT count(*) FROM singer"]]}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    sample = build_datasets(DataConfig(path=str(path), val_fraction=0.0, max_seq_len=4096), tok, seed=0).train[0]
    ids, labels = sample["input_ids"], sample["labels"]
    first_target_of_last_answer = max(i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100)

    messages, answer = prompt_and_answer(rec)
    style = prompt_style(load_run(tiny_run.run_dir), tok)
    assert render_prompt_ids(messages, tok, style) == ids[:first_target_of_last_answer]
    full, n_prompt = render_example_ids(messages, answer, tok, style)
    assert full == ids and n_prompt == first_target_of_last_answer


def test_example_ids_score_only_the_answer(tiny_run, loaded):
    _, tok = loaded
    style = prompt_style(load_run(tiny_run.run_dir), tok)
    prompt_ids = render_prompt_ids("q", tok, style)
    full, n_prompt = render_example_ids("q", "SELECT 1", tok, style)
    assert n_prompt == len(prompt_ids) and full[:n_prompt] == prompt_ids
    assert tok.decode(full[n_prompt:]) == "SELECT 1<|im_end|>\n</s>"


def test_greedy_generation_matches_a_plain_argmax_decoder(tiny_run, loaded):
    model, tok = loaded
    prompts = ["How many singers?", "SELECT name FROM singer WHERE age > 30 and a much longer prompt here", "x"]
    outs = generate(tiny_run.run_dir, prompts, max_new_tokens=12, model=model, tokenizer=tok)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs) and any(outs)
    stops = stop_token_ids(tok)
    style = prompt_style(load_run(tiny_run.run_dir), tok)
    for p, o in zip(prompts, outs):
        ref = _greedy_reference(model, render_prompt_ids(p, tok, style), 12, stops)
        assert o == tok.decode(ref, skip_special_tokens=True).strip()
    # a left-padded batch gives what each prompt gives alone
    alone = [generate(tiny_run.run_dir, [p], max_new_tokens=12, model=model, tokenizer=tok)[0] for p in prompts]
    assert outs == alone


def test_sampling_is_seeded(tiny_run, loaded):
    model, tok = loaded
    a = generate(tiny_run.run_dir, ["hello"], max_new_tokens=8, temperature=1.5, model=model, tokenizer=tok, seed=1)
    b = generate(tiny_run.run_dir, ["hello"], max_new_tokens=8, temperature=1.5, model=model, tokenizer=tok, seed=1)
    assert a == b


def test_cli_generate(tiny_run, capsys):
    parser = argparse.ArgumentParser()
    gen_mod.add_arguments(parser)
    args = parser.parse_args(["--adapter", str(tiny_run.run_dir), "--max-new-tokens", "4", "--device", "cpu",
                              "p1", "p2"])
    assert gen_mod.run(args) == 0
    out = capsys.readouterr().out
    assert "[1]" in out and "[2]" in out
