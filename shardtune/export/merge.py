"""`shardtune export`: merge an adapter into its base model (a plain HF checkpoint), or copy the PEFT adapter.

Both write atomically: into `<out>.tmp` first, then swapped into place, so an interrupted export never leaves a
half-written directory where a good one was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from shardtune.errors import ConfigError
from shardtune.export.adapter import (RUN_FILE, RunInfo, attach_adapter, load_base_model, load_run, load_tokenizer,
                                      resolve_device)

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp16", "fp32")
EXPORT_FILE = "shardtune_export.json"


def _torch_dtype(name: str):
    import torch

    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise ConfigError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}") from None


def _guard_out_dir(out: Path, info: RunInfo) -> None:
    """Refuse destinations that would overwrite the inputs or an unrelated directory."""
    out_r = out.resolve()
    protected = [info.adapter_dir.resolve()]
    if info.run_dir is not None:
        protected.append(info.run_dir.resolve())
    if info.base_is_local:
        protected.append(Path(info.base_model).expanduser().resolve())
    for p in protected:
        if out_r == p or out_r in p.parents:
            raise ConfigError(f"output directory '{out}' would overwrite the input '{p}'; choose a new directory")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output '{out}' exists and is a file; choose a directory path")
        contents = list(out.iterdir())
        ours = (out / EXPORT_FILE).is_file() or (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
        if contents and not ours:
            raise ConfigError(f"output directory '{out}' exists and does not hold a model or adapter; "
                              f"choose an empty or new directory")


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then replace `out_dir` by `tmp_dir`. On any failure the old `out_dir` is untouched."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    old = out.with_name(out.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)  # two renames: a directory cannot be atomically replaced by another on POSIX
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _provenance(info: RunInfo, kind: str, **extra) -> dict:
    return {"kind": kind, "adapter_dir": str(info.adapter_dir), "base_model": info.base_model,
            "method": info.method, **extra}


def merge(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", base: str | Path | None = None,
          device: str = "cpu") -> Path:
    """Merge the run's LoRA adapter into its base model and save a standalone HF model (safetensors + tokenizer).

    The base is always loaded unquantized in `dtype`, also for qlora runs. A qlora adapter was trained against the
    NF4-rounded base, but merging into 4-bit storage would re-quantize W + BA and wipe out most of the small LoRA
    update (the update is far below the NF4 step size). So the merge "dequantizes" by loading the original full-
    precision base and adding BA to it in `dtype`; the merged model differs from the 4-bit-plus-adapter model only
    by the NF4 rounding of the base, which is the usual and recommended trade (it is what QLoRA users deploy).
    Merging runs on the CPU by default so that it needs host RAM, not GPU memory, about 2 bytes/param for bf16.
    """
    info = load_run(run_dir, base=base)
    torch_dtype = _torch_dtype(dtype)
    out = Path(out_dir)
    _guard_out_dir(out, info)

    tokenizer = load_tokenizer(info)
    model = load_base_model(info, torch_dtype, resolve_device(device), quantize=None)
    if info.is_full:
        merged = model  # a full fine-tune has nothing to merge; this re-saves it in `dtype`
    else:
        merged = attach_adapter(model, info).merge_and_unload()
    merged.config.dtype = torch_dtype  # recorded in config.json so loaders pick the saved dtype by default

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_FILE).write_text(json.dumps(_provenance(info, "merged", dtype=dtype), indent=2))

    write_atomically(out, write)
    log.info("merged model written to %s", out)
    return out


def copy_adapter(run_dir: str | Path, out_dir: str | Path, base_name: Optional[str] = None,
                 base: str | Path | None = None) -> Path:
    """Copy the PEFT adapter (weights, adapter_config.json, tokenizer) and the run record to `out_dir`.

    `base_name` rewrites `base_model_name_or_path` in the copy, e.g. to the hub id of the base when the run used a
    local download, so that `PeftModel.from_pretrained` works on another machine.
    """
    info = load_run(run_dir, base=base)
    out = Path(out_dir)
    _guard_out_dir(out, info)

    def write(tmp: Path) -> None:
        for f in info.adapter_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if base_name is not None:
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base_name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if info.run_dir is not None and (info.run_dir / RUN_FILE).is_file():
            shutil.copy2(info.run_dir / RUN_FILE, tmp / RUN_FILE.replace(".json", ".source.json"))
        (tmp / EXPORT_FILE).write_text(json.dumps(_provenance(info, "adapter", base_name=base_name), indent=2))

    return write_atomically(out, write)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Export a trained adapter: --merge OUT_DIR writes a standalone merged model; "
                          "--out OUT_DIR copies the PEFT adapter.")
    parser.add_argument("--adapter", required=True, metavar="RUN_DIR",
                        help="training run directory (output.dir) or a PEFT adapter directory")
    dest = parser.add_mutually_exclusive_group(required=True)
    dest.add_argument("--merge", metavar="OUT_DIR", help="merge the adapter into the base and save a HF model here")
    dest.add_argument("--out", metavar="OUT_DIR", help="copy the PEFT adapter here (no merge)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="dtype of the merged weights (default bf16)")
    parser.add_argument("--base", metavar="DIR", help="base model directory, when the recorded one moved")
    parser.add_argument("--base-name", metavar="NAME",
                        help="with --out: write NAME as base_model_name_or_path in the copied adapter_config.json")
    parser.add_argument("--device", default="cpu", help="device to merge on (default cpu: needs RAM, not GPU memory)")


def run(args: argparse.Namespace) -> int:
    # ShardtuneErrors propagate: the CLI prints them as one line and exits 2.
    if args.merge:
        out = merge(args.adapter, args.merge, dtype=args.dtype, base=args.base, device=args.device)
        print(f"merged model ({args.dtype}) written to {out}")
    else:
        out = copy_adapter(args.adapter, args.out, base_name=args.base_name, base=args.base)
        print(f"adapter copied to {out}")
    return 0
