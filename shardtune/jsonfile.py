"""Reading a JSON object a user hands us (a DeepSpeed config, an adapter's config), with the one-line errors the CLI
prints: which file, what is wrong with it, and what to do."""

from __future__ import annotations

import json
from pathlib import Path

from shardtune.errors import ShardtuneError


def read_json_object(path: str | Path, label: str, fix: str, error: type[ShardtuneError],
                     missing: str | None = None) -> dict:
    """The JSON object in `path`. `label` names the file in messages ("parallel.deepspeed_config 'x.json'"), `fix`
    says what to do, `error` is the error class to raise; `missing` (a fix) makes a missing file an error too."""
    p = Path(path).expanduser()
    if missing is not None and not p.is_file():
        raise error(f"{label} not found; {missing}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{label} is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{label} must hold a JSON object; {fix}")
    return data
