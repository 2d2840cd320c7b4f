"""Checkpoints and the final adapter, written so that an interrupted run never replaces a good copy with a partial one.

Layout of an output dir:
  adapter/                       PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
  checkpoints/step-000040/       engine state (sharded where the engine shards), adapter/, COMPLETE marker
  shardtune_run.json             resolved config, base model dir, method, precision, summary
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose COMPLETE marker exists (a checkpoint cut off mid-write has none)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).exists())
    return done[-1] if done else None


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by the fully written `tmp` directory: rename the old copy aside, rename the new one in,
    then delete the old one. At every instant one complete copy exists on disk."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, state_dict: dict, tokenizer, final: Path, full: bool = False) -> None:
    """Write the PEFT adapter (or, for method=full, the whole model) to a temp dir, then swap it into place."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if full:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    swap_into_place(tmp, final)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def prune_checkpoints(out: Path, keep: int = 2) -> None:
    root = out / "checkpoints"
    if not root.is_dir():
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).exists())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
