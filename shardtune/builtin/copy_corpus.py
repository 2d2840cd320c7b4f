"""The generic copying lines the built-in base model is pretrained on (shardtune.builtin.pretrain_base).

A line is a few random filler words with one or two value words (a name or a number) placed anywhere, then a
separator and the same values again, in order: `lake Norway with capacity 2015 list -> Norway and 2015`. It teaches
one skill, repeating a value seen earlier in the text, and nothing of the toy SQL task: no line is a question, a
query or a schema, and the words are drawn at random. Seeded, so every build makes the same lines.
"""

from __future__ import annotations

import random
import re

from shardtune.builtin import toy_sql

# separator -> (joiner between two values, how a value is written after it). The line's separator decides both, so
# the target is a function of the prefix and a perfect copier reaches zero loss. After " =" strings are quoted and
# numbers bare, as SQL writes them.
STYLES = {" =": (" AND", "sql"), " :": (" ,", "bare"), " ->": (" and", "bare"), " is": (" and", "quoted")}
ENDINGS = ["", "", "?", "."]


def value_words() -> list[str]:
    """What a line copies: the names and numbers the toy set's questions contain (single words or two-word names),
    each on its own, never in a question or a query."""
    values = [*toy_sql.COUNTRIES, *toy_sql.CITIES, *toy_sql.STADIUMS, *toy_sql.SINGERS]
    values += [str(n) for n in (*toy_sql.YEARS, *toy_sql.AGES, *toy_sql.CAPACITIES)]
    return sorted(set(values))


def filler_words(vocab: dict[str, int]) -> list[str]:
    """Every word-start token of the tokenizer's vocabulary ('Ġ' is byte-level BPE's space) that is not part of a
    value or a piece of one."""
    parts = {w for v in value_words() for w in v.split()}
    words = {t[1:] for t in vocab if re.fullmatch(r"Ġ[A-Za-z][A-Za-z_]*", t)}
    return sorted(w for w in words if not any(p.startswith(w) for p in parts))


def copy_line(rng: random.Random, fillers: list[str], values: list[str]) -> tuple[str, str]:
    """(prefix, target): the prefix holds the fillers and values and ends with a separator; the target repeats the
    values in order, bare (` 2015`) or quoted (` 'Norway'`) as the separator's style says."""
    words = [rng.choice(fillers) for _ in range(rng.randint(2, 10))]
    chosen = rng.sample(values, 2 if rng.random() < 0.3 else 1)
    for v in sorted(chosen, key=lambda _: rng.random()):
        words.insert(rng.randint(0, len(words)), v)
    order = sorted(chosen, key=words.index)
    sep = rng.choice(sorted(STYLES))
    joiner, quoting = STYLES[sep]
    prefix = " ".join(words) + rng.choice(ENDINGS) + sep
    quoted = [quoting == "quoted" or (quoting == "sql" and not v.isdigit()) for v in order]
    return prefix, joiner.join(f" '{v}'" if q else f" {v}" for v, q in zip(order, quoted))
