"""Helpers for the data-pipeline tests (importable as `data_helpers` from tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

from shardtune.config import DataConfig


def write_jsonl(path: Path, records, raw_lines: dict[int, str] | None = None) -> Path:
    """Write records one per line; raw_lines {line_number: text} replaces given lines (1-based) verbatim."""
    lines = [json.dumps(r) for r in records]
    for n, text in (raw_lines or {}).items():
        lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def data_cfg(path, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(path=str(path), **kw)


def target_text(tok, sample) -> str:
    return tok.decode([i for i, lab in zip(sample["input_ids"], sample["labels"]) if lab != -100])


def prompt_text(tok, sample) -> str:
    return tok.decode([i for i, lab in zip(sample["input_ids"], sample["labels"]) if lab == -100])
