"""Checkpoints, the final adapter and the output directory, written so that no run is lost or silently replaced.

Layout of an output dir:
  adapter/                       PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
  checkpoints/step-000040/       engine state (parallel/state.py: safetensors + JSON, sharded where the engine
                                 shards; DeepSpeed: its own files), trainer-rank*.{json,safetensors} (step, RNG
                                 states), run.json (resolved config, engine, ranks), adapter/, COMPLETE
  shardtune_run.json             resolved config, base model dir, method, precision, summary
  metrics.jsonl, tensorboard/, loss.png

A checkpoint counts only with its COMPLETE marker, written last (after every rank fsynced its files), which lists
every file with its size and sha256: a truncated or altered checkpoint is skipped for the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shardtune.errors import ConfigError
from shardtune.train.metrics import METRIC_OUTPUTS

COMPLETE = "COMPLETE"
RUN_FILE = "run.json"
FORMAT = 2  # 1: pickled engine.pt (shardtune <= 0.1 before the reliability work), refused on resume

# what a run writes into output.dir; any of them present means the dir holds a run (the metrics backends' files
# too: an overwrite that left an earlier run's mlflow store or wandb id would mix two runs' metrics)
RUN_OUTPUTS = ("adapter", "checkpoints", "shardtune_run.json") + METRIC_OUTPUTS

# keys that may differ between a checkpoint and the run resuming it (docs/reliability.md); every other key of the
# resolved config changes what the saved state means or how the run continues, and stops the resume
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                     "train.resume", "train.max_bad_steps", "train.kernels", "train.gradient_checkpointing",
                     "train.checkpoint_layers", "train.checkpoint_policy", "train.fused_lora", "train.compile", "parallel.zero3_leaf_layers",
                     "train.fused_loss", "train.device", "parallel.strategy", "parallel.offload_optimizer", "parallel.offload_param",
                     "parallel.fsdp_layers_per_unit", "parallel.balance_tolerance", "plan.mode", "plan.gpus",
                     "plan.global_batch_size", "plan.margin", "output.dir", "output.tensorboard", "output.plot",
                     "output.overwrite", "output.report_to", "model.attn_implementation", "train.offload_activations",
                     "train.offload_layers")


# ------------------------------------------------------------------------------------------------ output dir
def existing_run(out: Path) -> list[str]:
    """The run outputs `out` already holds (empty: a fresh directory)."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def prepare_output_dir(out: Path, found: list[str], resume: bool, overwrite: bool, delete: bool) -> str | None:
    """Refuse to write into a directory holding another run (`found`, from `existing_run`), unless resuming it or
    told to start over; with `delete` (one rank), start over by deleting the previous run's outputs. Returns a line
    to print when something was deleted."""
    if not found or resume:
        return None
    if not overwrite:
        raise ConfigError(f"output.dir={out} already holds a run ({', '.join(found)}); continue it with "
                          "train.resume=true, start over with output.overwrite=true (deletes those), or choose "
                          "another output.dir")
    if not delete:
        return None
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f"output.overwrite: deleted the previous run's {', '.join(found)} in {out}"


# ------------------------------------------------------------------------------------------------ files
def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_dirs(root: Path) -> None:
    """fsync every directory under root (and root): the entries of files already fsynced by their writers."""
    for p in sorted({q.parent for q in root.rglob("*")} | {root}):
        fsync_dir(p)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            fsync_file(p)
    fsync_dirs(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def seal(d: Path, step: int) -> None:
    """Write the COMPLETE marker: every file of the checkpoint with its size and sha256. Called on rank 0 after all
    ranks fsynced their files."""
    files = {str(p.relative_to(d)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.rglob("*")) if p.is_file() and p.name != COMPLETE}
    write_json_atomic(d / COMPLETE, {"format": FORMAT, "step": step, "files": files})


def checkpoint_problem(d: Path) -> str | None:
    """Why checkpoint `d` cannot be used (None when every file is there with its recorded size and hash)."""
    try:
        marker = json.loads((d / COMPLETE).read_text())
    except (OSError, ValueError):
        return "its COMPLETE marker is unreadable"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return ("it was written by an older shardtune in a pickle format, which is not loaded (it could run code); "
                "start over with train.resume=false")
    for rel, info in marker.get("files", {}).items():
        p = d / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != info["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, {info['bytes']} were written"
        if _sha256(p) != info["sha256"]:
            return f"{rel} was altered after it was written (sha256 differs)"
    return None


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).exists())


def newest_sealed(out: Path) -> Path | None:
    """The newest checkpoint with its COMPLETE marker, not re-verified: what an error message names as the state to
    resume from (resume itself verifies with `latest_checkpoint`)."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


def latest_checkpoint(out: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint whose files check out; damaged ones are skipped with one line each."""
    for d in reversed(complete_checkpoints(out)):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        if say:
            say(f"resume: skipping {d}: {problem}")
    return None


def prune_checkpoints(out: Path, keep: int = 2) -> None:
    for p in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    root = out / "checkpoints"
    if root.is_dir():  # directories a crash left without a marker, older than the newest complete one
        done = complete_checkpoints(out)
        for p in root.iterdir():
            if p.is_dir() and not (p / COMPLETE).exists() and done and p.name < done[-1].name:
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ RNG + trainer state
def trainer_files(d: Path, rank: int) -> tuple[Path, Path]:
    return d / f"trainer-rank{rank:05d}.safetensors", d / f"trainer-rank{rank:05d}.json"


def save_trainer_state(d: Path, rank: int, step: int) -> list[Path]:
    """The step and every RNG the next step draws from (torch CPU and CUDA, python, numpy): dropout and anything
    random continue exactly as in an uninterrupted run."""
    from safetensors.torch import save_file
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss = random.getstate()
    meta = {"step": step, "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(py_state), gauss]}
    st, js = trainer_files(d, rank)
    save_file(tensors, str(st))
    js.write_text(json.dumps(meta))
    return [st, js]


def load_trainer_state(d: Path, rank: int) -> dict:
    from safetensors.torch import load_file
    st, js = trainer_files(d, rank)
    if not js.is_file():  # more ranks than wrote the checkpoint: take rank 0's streams
        st, js = trainer_files(d, 0)
    meta = json.loads(js.read_text())
    tensors = load_file(str(st))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = meta["python"]
    random.setstate((version, tuple(py_state), gauss))
    return meta


# ------------------------------------------------------------------------------------------------ resume check
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def resume_problem(saved: dict, config: dict, state_format: str, strategy: str, world_size: int) -> str | None:
    """Why the checkpoint whose run.json is `saved` cannot continue under this run (None if it can): each config
    key that differs and is not in RESUMABLE_CHANGES (old -> new), or an engine that cannot read its state. The
    batch shape may change with the rank count as long as the global batch (micro x accumulation x ranks) stays."""
    old, new = _flat(saved.get("config", {})), _flat(json.loads(json.dumps(config, default=str)))
    shape = ("train.micro_batch_size", "train.grad_accum")
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if k not in RESUMABLE_CHANGES and k not in shape and old.get(k) != new.get(k)]
    if all(k in old for k in shape):
        was = old[shape[0]] * old[shape[1]] * int(saved.get("world_size", 1))
        now = new[shape[0]] * new[shape[1]] * world_size
        if was != now:
            diffs.append(f"global batch (micro_batch_size x grad_accum x ranks): {was} -> {now}")
    if diffs:
        return ("the config changed in keys that change what the saved state means: " + "; ".join(diffs) +
                "; restore them, or start over with output.overwrite=true (or another output.dir)")
    was, ranks = saved.get("state_format"), int(saved.get("world_size", 1))
    where = f"parallel.strategy={saved.get('strategy')} on {ranks} rank(s)"
    if was != state_format:
        return (f"it was written by {where} and this run uses {strategy}, which stores its state differently; "
                f"resume with parallel.strategy={saved.get('strategy')}, or start over with output.overwrite=true")
    if was == "deepspeed" and ranks != world_size:
        return (f"it was written by {where} and DeepSpeed's ZeRO state only loads on the same number of ranks; "
                f"launch {ranks} processes, or start over with output.overwrite=true")
    return None


# ------------------------------------------------------------------------------------------------ adapter
def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by the fully written `tmp` directory: rename the old copy aside, rename the new one in,
    then delete the old one. At every instant one complete copy exists on disk."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def write_adapter(model, state_dict: dict, tokenizer, target: Path) -> None:
    """save_pretrained of the PEFT adapter (or, for method=full, the whole model) plus the tokenizer, fsynced."""
    model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    fsync_tree(target)


def save_adapter(model, state_dict: dict, tokenizer, final: Path) -> None:
    """Write the adapter to a temp dir, then swap it into place."""
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_adapter(model, state_dict, tokenizer, tmp)
    swap_into_place(tmp, final)


def non_finite(state_dict: dict) -> list[str]:
    """Names of tensors holding NaN or inf (an adapter with any of them is never written)."""
    return [n for n, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
