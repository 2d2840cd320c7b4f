"""Record formats and chat templates: what a record's keys mean, and how it becomes text with a known response part.

Every format except `text` becomes a conversation (system / user / assistant turns); the chat template then decides
the exact text, so one masking rule (loss on assistant turns only) serves all of them. `text` is continued
pretraining: the whole text is the target. Records that do not fit their format raise `BadRecord`, which the
pipeline reports with the file and line it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardtune.builtin.templates import ALPACA_TEMPLATE, CHATML_TEMPLATE, LLAMA3_TEMPLATE, PLAIN_TEMPLATE
from shardtune.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text", "text2sql")

# Key names seen in published text-to-SQL sets: DB-GPT-Hub (db_id, instruction, input, output), Spider
# (db_id, question, query), sql-create-context (question, context, answer), gretel (sql_prompt, sql_context, sql).
SQL_QUESTION_KEYS = ("question", "sql_prompt")
SQL_CONTEXT_KEYS = ("context", "schema", "sql_context")
SQL_ANSWER_KEYS = ("sql", "query")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool"}

FORMAT_KEYS_HELP = ("alpaca (instruction, input, output), messages (messages: [{role, content}]), "
                    "sharegpt (conversations: [{from, value}]), prompt_completion (prompt, completion), "
                    "text (text), text2sql (db_id + instruction/input/output, or question + context/schema + "
                    "answer/sql/query)")


class BadRecord(ValueError):
    """A record that does not fit its format; `kind` is a short reason used to count skipped records."""

    def __init__(self, kind: str, detail: str | None = None):
        super().__init__(detail or kind)
        self.kind = kind


@dataclass
class Example:
    """One record in a format-independent form: a conversation, or (format text) a single text trained on in full.
    `prompt` / `completion` keep prompt_completion records verbatim for data.chat_template=none."""
    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""  # file:line it came from, for messages about it after reading


# ------------------------------------------------------------------------------------------------ detection


def detect_format(record: dict) -> str | None:
    """The format a record's keys indicate, or None. Text-to-SQL is checked first: its DB-GPT-Hub form is also
    alpaca-shaped, and db_id is what tells them apart."""
    keys = set(record)
    has_sql_question = bool(keys & {*SQL_QUESTION_KEYS})
    if "db_id" in keys and (keys & {"instruction", *SQL_QUESTION_KEYS}) and (keys & {"output", "answer", *SQL_ANSWER_KEYS}):
        return "text2sql"
    if has_sql_question and keys & set(SQL_ANSWER_KEYS):
        return "text2sql"
    if has_sql_question and keys & set(SQL_CONTEXT_KEYS) and "answer" in keys:
        return "text2sql"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        turns = record["conversations"]
        first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
        return "messages" if "role" in first and "from" not in first else "sharegpt"
    # The remaining formats are recognised by their leading key alone, so that a first record missing its answer
    # is reported as exactly that (a bad line) rather than as an unknown format.
    if "instruction" in keys:
        return "alpaca"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


# ------------------------------------------------------------------------------------------------ field access


def _text(record: dict, key: str, required: bool = False, fmt: str = "") -> str | None:
    """A text field as str. CSV/Parquet readers give numbers for numeric-looking cells and None/NaN for empty ones."""
    v = record.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        if required:
            raise BadRecord(f"missing field '{key}'", f"record has no '{key}' (format {fmt}); keys found: "
                                                      f"{', '.join(map(str, record)) or 'none'}")
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise BadRecord(f"field '{key}' is not text", f"field '{key}' is {type(v).__name__}, expected text (format {fmt})")


def _first(record: dict, keys: tuple[str, ...], fmt: str, what: str) -> str:
    for k in keys:
        if k in record:
            v = _text(record, k, fmt=fmt)
            if v is not None:
                return v
    others = f" (nor {' / '.join(keys[1:])})" if len(keys) > 1 else ""
    raise BadRecord(f"missing field '{keys[0]}'",
                    f"record has no '{keys[0]}'{others}, the {what} (format {fmt}); keys found: "
                    f"{', '.join(map(str, record)) or 'none'}")


def _nonempty(value: str, key: str, fmt: str) -> str:
    if not value.strip():
        raise BadRecord(f"empty '{key}'", f"field '{key}' is empty (format {fmt}): nothing to train on")
    return value


def _history(record: dict, fmt: str) -> list[dict]:
    """LLaMA-Factory / DB-GPT-Hub `history`: earlier [question, answer] pairs, trained on like later turns."""
    hist = record.get("history")
    if hist is None or (isinstance(hist, float) and math.isnan(hist)):
        return []
    if not isinstance(hist, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in hist):
        raise BadRecord("bad 'history'", f"field 'history' must be a list of [question, answer] pairs (format {fmt})")
    turns = []
    for q, a in hist:
        if not isinstance(q, str) or not isinstance(a, str):
            raise BadRecord("bad 'history'", f"field 'history' holds a non-text pair (format {fmt})")
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turns


def _system(record: dict, fmt: str) -> list[dict]:
    s = _text(record, "system", fmt=fmt) if "system" in record else None
    return [{"role": "system", "content": s}] if s else []


def _content(value, where: str, fmt: str) -> str:
    """Message content: a string, or OpenAI content parts ([{type: text, text: ...}]) joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type", "text") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise BadRecord("bad message content", f"{where} has content of type {type(value).__name__}; expected text "
                                           f"(format {fmt})")


def _check_conversation(messages: list[dict], fmt: str) -> list[dict]:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no assistant reply", f"conversation has no assistant turn with content (format {fmt})")
    if messages[0]["role"] == "assistant":
        raise BadRecord("starts with assistant", f"conversation starts with an assistant turn (format {fmt}); "
                                                 "the first turn must be user or system")
    return messages


# ------------------------------------------------------------------------------------------------ per format


def _alpaca(r: dict) -> Example:
    instruction = _text(r, "instruction", required=True, fmt="alpaca")
    output = _nonempty(_first(r, ("output", "response"), "alpaca", "response"), "output", "alpaca")
    extra = _text(r, "input", fmt="alpaca") or _text(r, "context", fmt="alpaca") or ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    if not user.strip():
        raise BadRecord("empty 'instruction'", "fields 'instruction' and 'input' are both empty (format alpaca)")
    return Example(messages=_system(r, "alpaca") + _history(r, "alpaca") +
                   [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _text2sql(r: dict) -> Example:
    fmt = "text2sql"
    # Spider's own files keep a parsed tree (a dict) under 'sql' and the text under 'query': skip non-text keys
    keys = [k for k in ("output", *SQL_ANSWER_KEYS, "answer") if not (k in r and isinstance(r[k], (dict, list)))]
    sql = _nonempty(_first(r, tuple(keys), fmt, "SQL answer"), "output", fmt)
    if "instruction" in r and not any(k in r for k in SQL_QUESTION_KEYS):
        # DB-GPT-Hub: the instruction already holds schema and task; input holds the question (or is empty).
        instruction = _text(r, "instruction", required=True, fmt=fmt)
        question = _text(r, "input", fmt=fmt) or ""
        user = f"{instruction}\n\n{question}" if question else instruction
    else:
        question = _first(r, (*SQL_QUESTION_KEYS, "input"), fmt, "question")
        context = next((c for k in SQL_CONTEXT_KEYS if (c := _text(r, k, fmt=fmt))), "")
        user = f"{context}\n\n{question}" if context else question
    if not user.strip():
        raise BadRecord("empty question", "record has neither a question nor a schema (format text2sql)")
    return Example(messages=_system(r, fmt) + _history(r, fmt) +
                   [{"role": "user", "content": user}, {"role": "assistant", "content": sql}])


def _messages(r: dict) -> Example:
    key = "messages" if "messages" in r else "conversations"
    turns = r.get(key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"bad '{key}'", f"field '{key}' must be a non-empty list of {{role, content}} (format messages)")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("role"), str):
            raise BadRecord("bad message", f"{key}[{i}] is not an object with a text 'role' (format messages)")
        m = {k: v for k, v in t.items() if k not in ("role", "content")}
        m.update(role=t["role"], content=_content(t.get("content"), f"{key}[{i}]", "messages"))
        messages.append(m)
    return Example(messages=_check_conversation(_system(r, "messages") + messages, "messages"))


def _sharegpt(r: dict) -> Example:
    turns = r.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("bad 'conversations'", "field 'conversations' must be a non-empty list of {from, value} "
                                               "(format sharegpt)")
    messages = _system(r, "sharegpt")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t:
            raise BadRecord("bad message", f"conversations[{i}] has no 'from' (format sharegpt)")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise BadRecord("unknown role", f"conversations[{i}] has from={t['from']!r}; known: "
                                            f"{', '.join(sorted(SHAREGPT_ROLES))} (format sharegpt)")
        messages.append({"role": role, "content": _content(t.get("value"), f"conversations[{i}]", "sharegpt")})
    return Example(messages=_check_conversation(messages, "sharegpt"))


def _prompt_completion(r: dict) -> Example:
    p, c = r.get("prompt"), r.get("completion")
    if isinstance(p, list) or isinstance(c, list):
        # TRL's conversational prompt-completion: both are lists of messages.
        if not (isinstance(p, list) and isinstance(c, list)):
            raise BadRecord("bad prompt/completion", "prompt and completion must both be text or both be message "
                                                     "lists (format prompt_completion)")
        return _messages({"messages": p + c})
    prompt = _text(r, "prompt", required=True, fmt="prompt_completion")
    completion = _nonempty(_text(r, "completion", required=True, fmt="prompt_completion"), "completion",
                           "prompt_completion")
    return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                   prompt=prompt, completion=completion)


def _plain_text(r: dict) -> Example:
    return Example(text=_nonempty(_text(r, "text", required=True, fmt="text"), "text", "text"))


_CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt,
               "prompt_completion": _prompt_completion, "text": _plain_text, "text2sql": _text2sql}


def to_example(record, fmt: str) -> Example:
    """Convert one raw record; raises BadRecord when it does not fit `fmt`."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"record is {type(record).__name__}, expected a JSON object")
    return _CONVERTERS[fmt](record)


# ------------------------------------------------------------------------------------------------ chat templates

# The template texts live in shardtune.builtin.templates (the built-in tokenizer is trained on ChatML).
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "alpaca": ALPACA_TEMPLATE,
                     "plain": PLAIN_TEMPLATE}
CHAT_TEMPLATES = BUILTIN_TEMPLATES  # the name shardtune.export.generate looks up
TEMPLATE_CHOICES = ("auto", *BUILTIN_TEMPLATES, "none")
# Formats whose records already hold the exact text to train on, so they can go without a template.
VERBATIM_FORMATS = ("prompt_completion", "text")


def tokenizer_template(tokenizer) -> str | None:
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # several named templates: the default one is what generate() would use
        tmpl = tmpl.get("default")
    return tmpl or None


def resolve_chat_template(choice: str, tokenizer, fmt: str) -> tuple[str | None, str, str | None]:
    """(template text or None for verbatim, a name for logs, a one-line notice or None).

    `auto` is the tokenizer's own template, else the built-in ChatML (with a notice: never a silent fallback).
    A literal Jinja template is accepted too. `none` is only valid where the record holds the exact text already.
    """
    choice = (choice or "none").strip()
    if fmt == "text":
        return None, "none (format text)", None
    if choice.lower() == "none":
        if fmt in VERBATIM_FORMATS:
            return None, "none", None
        raise DataError(f"data.format={fmt} needs a chat template to turn records into text, but "
                        f"data.chat_template=none; set data.chat_template=auto (the tokenizer's own, else chatml) "
                        f"or one of {', '.join(BUILTIN_TEMPLATES)}")
    if choice == "auto":
        own = tokenizer_template(tokenizer)
        if own:
            return own, "tokenizer", None
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        return CHATML_TEMPLATE, "chatml", (f"shardtune: tokenizer {name} has no chat template; data.chat_template=auto "
                                           "uses the built-in chatml (set data.chat_template to choose another)")
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice], choice, None
    if "{{" in choice or "{%" in choice:
        return choice, "custom", None
    raise DataError(f"data.chat_template: unknown template '{choice}'; accepted: {' | '.join(TEMPLATE_CHOICES)} "
                    "or a Jinja template string")


class TemplateNotIncremental(Exception):
    """The template renders a conversation's prefix differently from the start of the whole conversation."""


def conversation_segments(messages: list[dict], render) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into (text, is_target) pieces: each assistant turn (with its end-of-turn
    marker) is a target; everything before it, including the generation prompt, is not.

    `render(messages, add_generation_prompt) -> str`. The cut points come from rendering prefixes, so any
    template works whose rendering of a prefix is the start of the rendering of the whole (checked).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], True)
        full = render(messages[:i + 1], False)
        if not head.startswith(done) or not full.startswith(head):
            raise TemplateNotIncremental()
        segments.append((head[len(done):], False))
        segments.append((full[len(head):], True))
        done = full
    if messages[-1]["role"] != "assistant":
        whole = render(messages, False)
        if not whole.startswith(done):
            raise TemplateNotIncremental()
        segments.append((whole[len(done):], False))
    return [(t, target) for t, target in segments if t]


def prompt_and_answer(record: dict, fmt: str = "auto") -> tuple[list[dict], str]:
    """(conversation up to the last assistant turn, that turn's text) of one record, laid out exactly as training
    lays it out: what `generate` / `evaluate` should prompt with and compare against. Format `text` gives ([], text)."""
    if fmt == "auto":
        fmt = detect_format(record) if isinstance(record, dict) else None
        if fmt is None:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"cannot detect the record format from keys ({keys}); accepted: {FORMAT_KEYS_HELP}")
    try:
        ex = to_example(record, fmt)
    except BadRecord as e:
        raise DataError(f"record does not fit format {fmt}: {e}") from None
    if ex.text is not None:
        return [], ex.text
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]
