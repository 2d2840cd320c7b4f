"""From a data file to token samples the loop can batch: read, detect the format, render, tokenize, mask, split, pack.

Every record that cannot be used is either a one-line DataError naming file:line and the fix, or (with
data.on_bad_line=skip) a counted warning: nothing is dropped silently. `collate` pads a micro batch; packed rows carry
position_ids that restart at 0 per sample and no attention_mask, which makes transformers build a block-diagonal
causal mask (verified against running the samples separately in tests/data/test_packing.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from jinja2.exceptions import TemplateError

from shardtune.builtin.toy_sql import BUILTIN_DATA, builtin_records
from shardtune.data import formats
from shardtune.data.formats import BadRecord, Example
from shardtune.errors import DataError

IGNORE_INDEX = -100
MAX_BAD_LINE_WARNINGS = 10
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    stats: dict = field(default_factory=dict)


def _warn(msg: str) -> None:
    # Every rank builds the data; one copy of each warning is enough.
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ bad lines


class BadLines:
    """Applies data.on_bad_line: stop at the first bad record, or warn (up to a cap) and count."""

    def __init__(self, mode: str, key: str):
        self.mode, self.key = mode, key
        self.count = 0
        self.kinds: Counter = Counter()

    def report(self, where: str, kind: str, detail: str) -> None:
        if self.mode != "skip":
            raise DataError(f"{where}: {detail}; fix the record or set data.on_bad_line=skip to skip bad records")
        self.count += 1
        self.kinds[kind] += 1
        if self.count <= MAX_BAD_LINE_WARNINGS:
            _warn(f"shardtune: skipping {where}: {detail}")
        elif self.count == MAX_BAD_LINE_WARNINGS + 1:
            _warn(f"shardtune: more bad records in {self.key}; counting them without printing each")


# ------------------------------------------------------------------------------------------------ reading


def _lineno(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_array(text: str, path: str, bad: BadLines) -> Iterator[tuple[str, object]]:
    """Elements of a JSON array with the line each starts on. A syntax error inside an array cannot be skipped
    (there is no reliable place to resume), so it always stops, naming the line."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i = text.index("[") + 1
    line, counted_to = 1, 0

    def skip(j: int) -> int:
        while j < len(text) and text[j] in ws:
            j += 1
        return j

    def fail(pos: int, what: str):
        raise DataError(f"{path}:{_lineno(text, pos)}: malformed JSON ({what}); a JSON array cannot be read past a "
                        "syntax error: fix the file, or write it as JSON Lines (one record per line) and use "
                        "data.on_bad_line=skip")

    i = skip(i)
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                fail(e.pos, e.msg)
            line += text.count("\n", counted_to, i)
            counted_to = i
            yield f"{path}:{line}", obj
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i = skip(i + 1)
                break
            fail(i, "expected ',' or ']' after a record")
    if i != len(text):
        fail(i, "extra data after the closing ']'")


def _json_lines(text: str, path: str, bad: BadLines) -> Iterator[tuple[str, object]]:
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.report(f"{path}:{n}", "malformed JSON", f"malformed JSON line ({e.msg} at column {e.colno})")
            continue
        yield f"{path}:{n}", obj


def _tabular(p: Path, path: str) -> Iterator[tuple[str, object]]:
    """CSV / Parquet through `datasets`, kept quiet and with its cache in a temporary folder (not the user's home).
    Locations are `path:N` with N the line of a CSV without multi-line cells (header is line 1), or the Parquet row."""
    import datasets

    datasets.disable_progress_bars()
    # a file it cannot read comes back as the one-line DataError below; datasets' own ERROR line would repeat it
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="shardtune-data-") as cache:
        try:
            if p.suffix == ".csv":
                ds = datasets.Dataset.from_csv(str(p), cache_dir=cache, keep_in_memory=True)
            else:
                ds = datasets.Dataset.from_parquet(str(p), cache_dir=cache, keep_in_memory=True)
            rows = ds.to_list()
        except Exception as e:  # pandas / pyarrow parse errors come in many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{path}: cannot read as {p.suffix[1:].upper()} ({first}); check the file's format") from None
    offset = 2 if p.suffix == ".csv" else 0
    for n, row in enumerate(rows):
        for k, v in row.items():  # JSON-looking cells (e.g. a messages column written to CSV) become structures
            if isinstance(v, str) and v[:1] in "[{" and p.suffix == ".csv":
                try:
                    row[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
        yield f"{path}:{n + offset}", row


def iter_records(path: str, key: str, bad: BadLines) -> Iterator[tuple[str, object]]:
    """(location, raw record) for every record of a file or built-in set; malformed lines go to `bad`."""
    if path.startswith("builtin:"):
        for n, r in enumerate(builtin_records(path, key), 1):
            yield f"{path}#{n}", r
        return
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key} '{path}' not found; pass a .json/.jsonl/.csv/.parquet file or {BUILTIN_DATA}")
    if p.is_dir():
        raise DataError(f"{key} '{path}' is a directory; pass one .json/.jsonl/.csv/.parquet file")
    suffix = p.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{key} '{path}' has unknown extension '{p.suffix}'; accepted: {', '.join(EXTENSIONS)}")
    if suffix in (".csv", ".parquet"):
        yield from _tabular(p, path)
        return
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"{key} '{path}' cannot be read ({e.strerror}); check its permissions") from None
    text = text.lstrip("\ufeff")
    head = text.lstrip()[:1]
    if suffix == ".json" and head == "[":
        yield from _json_array(text, path, bad)
    elif head == "{" or suffix == ".jsonl" or not head:
        if suffix == ".json" and head == "{":
            try:  # a .json holding one (possibly multi-line) object rather than JSON Lines
                whole = json.loads(text)
                if "\n" in text.strip():
                    raise DataError(f"{path}: one JSON object spanning several lines; expected a list of records "
                                    "([{...}, ...]) or JSON Lines (one record per line)")
                yield f"{path}:1", whole
                return
            except json.JSONDecodeError:
                pass  # several objects: JSON Lines
        yield from _json_lines(text, path, bad)
    else:
        raise DataError(f"{path}:1: not JSON (starts with {head!r}); expected a list of records or JSON Lines")


def read_examples(path: str, key: str, fmt: str, bad: BadLines, limit: int | None = None) -> tuple[list[Example], str, int]:
    """Read and convert records. The format (if auto) is detected from the first object record's keys.
    Returns (examples, format, records read); `limit` stops after that many usable records."""
    examples: list[Example] = []
    n_read = 0
    for where, rec in iter_records(path, key, bad):
        n_read += 1
        if fmt == "auto":
            if not isinstance(rec, dict):
                bad.report(where, "not an object", f"record is {type(rec).__name__}, expected a JSON object")
                continue
            detected = formats.detect_format(rec)
            if detected is None:
                keys = ", ".join(map(str, rec)) or "none"
                raise DataError(f"{where}: cannot detect the record format from keys ({keys}); set data.format to "
                                f"one of: {formats.FORMAT_KEYS_HELP}")
            fmt = detected
        try:
            ex = formats.to_example(rec, fmt)
        except BadRecord as e:
            bad.report(where, e.kind, str(e))
            continue
        ex.where = where
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    return examples, fmt, n_read


# ------------------------------------------------------------------------------------------------ tokenizing


class _Encoder:
    """Renders examples to (text, is_target) pieces and tokenizes them in one batched call."""

    def __init__(self, tokenizer, template: str | None, template_name: str, train_on_prompt: bool):
        self.tok, self.template, self.template_name = tokenizer, template, template_name
        self.train_on_prompt = train_on_prompt
        self.eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        # Add a BOS only where the tokenizer itself would (Llama 2 / 3 do, Qwen does not).
        self.bos = bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None

    def _render(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        if ex.text is not None:
            return [(ex.text, True)]
        if self.template is None:  # data.chat_template=none: the record's own text, verbatim
            return [(ex.prompt, False), (ex.completion, True)]
        try:
            return formats.conversation_segments(ex.messages, self._render)
        except TemplateError as e:  # e.g. a template that refuses system turns or non-alternating roles
            raise BadRecord("rejected by the chat template",
                            f"chat template '{self.template_name}' rejects the record ({e})") from None
        except formats.TemplateNotIncremental:
            raise DataError(f"chat template '{self.template_name}' renders a conversation's start differently from "
                            "the whole conversation, so prompt and response tokens cannot be told apart; set "
                            "data.chat_template=chatml (or llama3 | alpaca | plain)") from None

    def encode(self, pieces: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[int]]]:
        flat = [t for segs in pieces for t, _ in segs]
        ids_flat = self.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, k = [], 0
        for segs in pieces:
            ids: list[int] = []
            labels: list[int] = []
            last_target: list[int] = []
            for _, target in segs:
                t = ids_flat[k]
                k += 1
                ids += t
                labels += t if (target or self.train_on_prompt) else [IGNORE_INDEX] * len(t)
                if target:
                    last_target = t
            # The response must end in EOS so the model learns to stop; templates that already write it
            # (Llama 3's <|eot_id|> as eos, alpaca/plain here) are left alone.
            if self.eos is not None and self.eos not in last_target:
                ids.append(self.eos)
                labels.append(self.eos)
            if self.bos is not None and ids[:1] != [self.bos]:
                ids.insert(0, self.bos)
                labels.insert(0, IGNORE_INDEX)
            out.append((ids, labels))
        return out


def _tokenize(examples: list[Example], enc: _Encoder, max_len: int, counts: Counter, bad: BadLines) -> list[dict]:
    pieces = []
    for ex in examples:
        try:
            pieces.append(enc.segments(ex))
        except BadRecord as e:
            bad.report(ex.where, e.kind, str(e))
    samples = []
    for ids, labels in enc.encode(pieces):
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            counts["truncated"] += 1
        labels[0] = IGNORE_INDEX  # never predicted (no previous token); also keeps packed samples apart
        if all(lab == IGNORE_INDEX for lab in labels):
            counts["no_target"] += 1
            continue
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def pack(samples: list[dict], max_len: int) -> list[dict]:
    """Greedy in order: fill a row until the next sample would overflow max_len. position_ids restart at 0 for
    every sample, which is what tells attention (and flash-attention's varlen path) where samples begin."""
    rows: list[dict] = []
    cur: dict | None = None
    for s in samples:
        n = len(s["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > max_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(cur)
        cur["input_ids"] += s["input_ids"]
        cur["labels"] += s["labels"]
        cur["position_ids"] += list(range(n))
    return rows


# ------------------------------------------------------------------------------------------------ the data set


def _holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices in a seeded order, val indices): at least one val record when fraction > 0 and n >= 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = 0
    if fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, round(n * fraction)))
    return order[n_val:], sorted(order[:n_val])


def _summary_tokens(samples: list[dict]) -> tuple[int, int]:
    tokens = sum(len(s["input_ids"]) for s in samples)
    targets = sum(sum(1 for t in s["labels"][1:] if t != IGNORE_INDEX) for s in samples)
    return tokens, targets


def build_datasets(data_cfg, tokenizer, seed: int) -> Splits:
    """Train / val samples for `data_cfg` (shardtune.config.DataConfig) tokenized with `tokenizer`.

    Each sample: input_ids, labels (-100 on prompt tokens unless train_on_prompt; the response and the EOS after it
    labelled), plus position_ids when packed. stats: what was read, skipped (by reason), truncated, and token counts.
    """
    max_len = int(data_cfg.max_seq_len)
    if max_len < 2:
        raise DataError(f"data.max_seq_len={max_len} is too small; use at least 2 (typically 512 or more)")
    if data_cfg.on_bad_line not in ("error", "skip"):
        raise DataError(f"data.on_bad_line={data_cfg.on_bad_line!r}; accepted: error | skip")
    fmt = data_cfg.format
    if fmt != "auto" and fmt not in formats.FORMATS:
        raise DataError(f"data.format: unknown format '{fmt}'; accepted: auto, {', '.join(formats.FORMATS)}")
    if data_cfg.max_samples is not None and data_cfg.max_samples < 1:
        raise DataError(f"data.max_samples={data_cfg.max_samples}; must be >= 1 (or unset for all records)")

    bad = BadLines(data_cfg.on_bad_line, "data.path")
    examples, fmt, n_read = read_examples(data_cfg.path, "data.path", fmt, bad, data_cfg.max_samples)
    _no_records(examples, data_cfg.path, n_read, bad)

    template, template_name, notice = formats.resolve_chat_template(data_cfg.chat_template, tokenizer, fmt)
    if notice:
        _warn(notice)

    val_bad = BadLines(data_cfg.on_bad_line, "data.val_path")
    if data_cfg.val_path:
        train_ex = examples
        random.Random(seed).shuffle(train_ex)
        val_fmt = data_cfg.format if data_cfg.format != "auto" else "auto"
        val_ex, val_fmt, val_read = read_examples(data_cfg.val_path, "data.val_path", val_fmt, val_bad)
        _no_records(val_ex, data_cfg.val_path, val_read, val_bad)
        val_template = template
        if val_fmt != fmt:
            val_template, _, _ = formats.resolve_chat_template(data_cfg.chat_template, tokenizer, val_fmt)
    else:
        tr_idx, va_idx = _holdout(len(examples), data_cfg.val_fraction, seed)
        train_ex, val_ex = [examples[i] for i in tr_idx], [examples[i] for i in va_idx]
        val_template, val_read = template, 0

    counts: Counter = Counter()
    bad_before = bad.count + val_bad.count
    enc = _Encoder(tokenizer, template, template_name, data_cfg.train_on_prompt)
    train = _tokenize(train_ex, enc, max_len, counts, bad)
    val_enc = enc if val_template is template else _Encoder(tokenizer, val_template, "val", data_cfg.train_on_prompt)
    val = _tokenize(val_ex, val_enc, max_len, counts, val_bad if data_cfg.val_path else bad)
    if counts["no_target"]:
        _warn(f"shardtune: {counts['no_target']} records have no response tokens within data.max_seq_len={max_len} "
              "and were dropped; raise data.max_seq_len to keep them")
    rejected = bad.count + val_bad.count - bad_before
    if not train:
        raise DataError(f"data.path '{data_cfg.path}': no training samples left after tokenizing {len(train_ex)} "
                        f"records ({counts['no_target']} without response tokens within data.max_seq_len={max_len}, "
                        f"{rejected} rejected by the chat template); raise data.max_seq_len or change "
                        "data.chat_template")
    if bad.count or val_bad.count:
        for b, p in ((bad, data_cfg.path), (val_bad, data_cfg.val_path)):
            if b.count:
                _warn(f"shardtune: skipped {b.count} bad records in {p} ({_kinds(b.kinds)})")

    train_tokens, train_targets = _summary_tokens(train)
    val_tokens, val_targets = _summary_tokens(val)
    stats = {
        "path": data_cfg.path, "val_path": data_cfg.val_path, "format": fmt, "chat_template": template_name,
        "records_read": n_read + val_read, "records_used": len(train_ex) + len(val_ex) - rejected,
        "skipped": {**{k: v for k, v in (bad.kinds + val_bad.kinds).items()},
                    **({"no response tokens within max_seq_len": counts["no_target"]} if counts["no_target"] else {})},
        "bad_lines": bad.count + val_bad.count, "truncated": counts["truncated"],
        "train_samples": len(train), "val_samples": len(val),
        "train_tokens": train_tokens, "train_target_tokens": train_targets,
        "val_tokens": val_tokens, "val_target_tokens": val_targets,
        "max_seq_len": max_len, "packing": bool(data_cfg.packing),
    }
    if data_cfg.packing:
        train, val = pack(train, max_len), pack(val, max_len)
        stats["train_rows"], stats["val_rows"] = len(train), len(val)
        stats["packing_efficiency"] = round(train_tokens / max(1, len(train) * max_len), 3)
    return Splits(train=train, val=val, stats=stats)


def _kinds(kinds: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in kinds.most_common())


def _no_records(examples: list, path: str, n_read: int, bad: BadLines) -> None:
    if examples:
        return
    if n_read == 0:
        raise DataError(f"{bad.key} '{path}' holds no records; add records or point {bad.key} at another file")
    raise DataError(f"{bad.key} '{path}': no usable records ({n_read} read, {bad.count} skipped: {_kinds(bad.kinds)}); "
                    "fix the records or check data.format")


def format_stats(stats: dict) -> str:
    """One line for the run log."""
    s = (f"data: {stats['format']} via {stats['chat_template']} | {stats['train_samples']} train / "
         f"{stats['val_samples']} val samples | {stats['train_tokens']:,} train tokens "
         f"({stats['train_target_tokens']:,} targets)")
    if stats.get("truncated"):
        s += f" | {stats['truncated']} truncated to {stats['max_seq_len']}"
    if stats.get("skipped"):
        s += f" | skipped: {', '.join(f'{n} {k}' for k, n in stats['skipped'].items())}"
    if stats.get("packing"):
        s += f" | packed into {stats['train_rows']} rows ({stats['packing_efficiency']:.0%} full)"
    return s


# ------------------------------------------------------------------------------------------------ batching


def collate(samples: list[dict], pad_id: int | None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a micro batch. Unpacked: input_ids, labels (-100 on padding), attention_mask. Packed (samples
    carry position_ids): input_ids, labels, position_ids and no attention_mask, so transformers derives the
    block-diagonal causal mask from where position_ids restart; padding continues as its own block (0, 1, ...)
    with label -100. The model must run with use_cache=False (shardtune's loader sets it): with a KV cache
    transformers skips the packed-sequence detection."""
    if not samples:
        raise ValueError("collate() needs at least one sample")
    packed = "position_ids" in samples[0]
    if any(("position_ids" in s) != packed for s in samples):
        raise ValueError("collate(): cannot mix packed and unpacked samples in one batch")
    pad = 0 if pad_id is None else int(pad_id)  # e.g. Llama 3 has no pad token; padded positions are masked anyway
    length = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    ids, labels, extra = [], [], []
    for s in samples:
        n = len(s["input_ids"])
        fill = length - n
        ids.append(list(s["input_ids"]) + [pad] * fill)
        labels.append(list(s["labels"]) + [IGNORE_INDEX] * fill)
        extra.append(list(s["position_ids"]) + list(range(fill)) if packed else [1] * n + [0] * fill)
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
    key = "position_ids" if packed else "attention_mask"
    batch[key] = torch.tensor(extra, dtype=torch.long)
    return batch


def count_target_tokens(batch: dict) -> int:
    """Tokens that contribute to the loss: labels other than -100 after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
