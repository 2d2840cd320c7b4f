"""Fixtures for the data-pipeline tests: small tokenizers built locally (helpers live in data_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE tokenizer trained on the toy set plus generic words, with the ChatML template."""
    from shardtune.builtin.tiny_model import build_tokenizer
    from shardtune.builtin.toy_sql import builtin_corpus

    extra = ["Say hello to the user. Hello Bob! The answer is forty two. What is two plus two? Four.",
             "### Instruction:\n### Response:\nBelow is an instruction that describes a task."]
    return build_tokenizer(builtin_corpus()[:200] + extra * 20, vocab_size=600)


@pytest.fixture(scope="session")
def tok_no_template():
    from shardtune.builtin.tiny_model import build_tokenizer

    return build_tokenizer(["hello world, how many singers are there? SELECT count(*) FROM singer"] * 10,
                           vocab_size=300, chat_template=None)
