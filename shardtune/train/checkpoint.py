"""Checkpoints and the final adapter, written so that an interrupted run never replaces a good copy with a partial one.

Layout of an output dir:
  adapter/                       PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
  checkpoints/step-000040/       engine state (sharded where the engine shards), adapter/, engine.json (which
                                 engine on how many ranks wrote it), COMPLETE marker
  shardtune_run.json             resolved config, base model dir, method, precision, summary
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
ENGINE_FILE = "engine.json"

# how each engine stores its optimizer state: none and DDP write one replicated file; FSDP2 writes a distributed
# checkpoint that torch re-shards for any number of ranks; DeepSpeed's ZeRO files only load on the same rank count
_STATE_FORMAT = {"none": "replicated", "ddp": "replicated", "fsdp": "dcp", "deepspeed": "deepspeed"}


def resume_problem(saved: dict, strategy: str, world_size: int) -> str | None:
    """Why a checkpoint written by engine `saved` ({"strategy", "world_size"}) cannot resume under `strategy` on
    `world_size` ranks (None if it can)."""
    was, ranks = saved.get("strategy"), int(saved.get("world_size", 1))
    if was not in _STATE_FORMAT:
        return None
    where = f"parallel.strategy={was} on {ranks} rank(s)"
    if _STATE_FORMAT[was] != _STATE_FORMAT.get(strategy):
        return (f"it was written by {where} and this run uses {strategy}, which stores optimizer state differently; "
                f"resume with parallel.strategy={was}, or set train.resume=false to start over")
    if was == "deepspeed" and ranks != world_size:
        return (f"it was written by {where} and DeepSpeed's ZeRO state only loads on the same number of ranks; "
                f"launch {ranks} processes, or set train.resume=false to start over")
    return None


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
