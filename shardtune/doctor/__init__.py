"""`shardtune doctor`: check packages, GPUs, bitsandbytes, distributed backends, disk and RAM against what a config
needs, before any weight is read. Each check is OK / WARN / FAIL with a one-line fix; FAIL means the run would stop.

Version knowledge lives in the tables below (ranges, tested combinations, known-bad pairs with the reason), plus
every installed package's own declared requirements, so the rules can be read and updated in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from shardtune.doctor.checks import FAIL, OK, WARN, Check, Needs  # noqa: F401  (re-exported)
from shardtune.doctor.devices import *  # noqa: F401,F403  (re-exported: tests and callers use shardtune.doctor.X)
from shardtune.doctor.devices import (GpuInfo, check_bnb_4bit, check_deepspeed, check_distributed, check_gpus,
                                      detect_gpus)
from shardtune.doctor.versions import *  # noqa: F401,F403
from shardtune.doctor.versions import (check_declared_requirements, check_known_bad, check_python,
                                       check_tested_combo, check_transformers_sees_torch, check_versions,
                                       installed_versions)
from shardtune.hardware import GiB

# ---------------------------------------------------------------- disk, RAM, paths


def _existing_ancestor(path: Path) -> Path:
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def model_bytes(model: Optional[str]) -> Optional[int]:
    """Size of the weights of a local model directory (None for hub ids and built-ins)."""
    if not model or model.startswith("builtin:"):
        return None
    p = Path(model).expanduser()
    if not p.is_dir():
        return None
    files = list(p.glob("*.safetensors")) or list(p.glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def check_disk(output_dir: str, free_bytes: Optional[int] = None, model_size: Optional[int] = None) -> Check:
    where = _existing_ancestor(Path(output_dir))
    free = shutil.disk_usage(where).free if free_bytes is None else free_bytes
    # adapters and checkpoints are small; a merged export needs about the base model's size again
    want = max(5 * GiB, model_size or 0)
    detail = f"{free / GiB:.1f} GiB free at {where}"
    if free < 1 * GiB:
        return Check("disk", FAIL, detail, f"free space under {output_dir} or set output.dir elsewhere")
    if free < want:
        need = f"~{want / GiB:.0f} GiB" + (" (a merged export is as large as the base model)" if model_size else "")
        return Check("disk", WARN, f"{detail}; checkpoints and exports want {need}",
                     "free space or set output.dir to a larger disk")
    return Check("disk", OK, detail)


def check_ram(available: Optional[int] = None, total: Optional[int] = None,
              model_size: Optional[int] = None) -> Check:
    if available is None or total is None:
        try:
            import psutil
            vm = psutil.virtual_memory()
            available, total = vm.available, vm.total
        except ImportError:
            return Check("cpu ram", WARN, "psutil not installed; cannot read memory", "pip install psutil")
    detail = f"{available / GiB:.1f} GiB available of {total / GiB:.1f} GiB"
    if available < 2 * GiB:
        return Check("cpu ram", WARN, detail, "close other programs; loading tokenizer and shards needs a few GiB")
    if model_size and available < model_size:
        return Check("cpu ram", WARN, f"{detail}; `shardtune export --merge` loads the whole base "
                                      f"({model_size / GiB:.1f} GiB) in CPU memory",
                     "merge on a machine with more RAM, or export the adapter only (--out)")
    return Check("cpu ram", OK, detail)


def check_paths(needs: Needs) -> list[Check]:
    checks = []
    if needs.model and not needs.model.startswith("builtin:"):
        p = Path(needs.model).expanduser()
        if p.exists():
            ok = p.is_dir() and (p / "config.json").is_file()
            checks.append(Check("model", OK if ok else FAIL, str(p) + ("" if ok else " has no config.json"),
                                "" if ok else "point model.name_or_path at a Hugging Face model directory"))
        elif needs.model.startswith((".", "/", "~")) or needs.model.count("/") != 1:
            checks.append(Check("model", FAIL, f"model.name_or_path '{needs.model}' does not exist",
                                "pass a local model directory or a hub id like meta-llama/Llama-3.1-8B"))
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            checks.append(Check("model", WARN if offline else OK,
                                f"hub id {needs.model} (downloaded by `shardtune train`)" +
                                ("; but HF_HUB_OFFLINE is set" if offline else ""),
                                "download it first or unset HF_HUB_OFFLINE" if offline else ""))
    if needs.data and not needs.data.startswith("builtin:"):
        ok = Path(needs.data).expanduser().is_file()
        checks.append(Check("data", OK if ok else FAIL, needs.data + ("" if ok else " not found"),
                            "" if ok else "set data.path to a .json/.jsonl/.csv/.parquet file"))
    return checks


# ---------------------------------------------------------------- driver


def run_doctor(cfg=None, gpus: Optional[list[GpuInfo]] = None,
               versions: Optional[dict[str, Optional[str]]] = None) -> list[Check]:
    """All checks for this machine and (optionally) a RunConfig. `gpus` / `versions` replace detection (tests)."""
    live_versions = versions is None
    versions = installed_versions() if versions is None else versions
    if versions.get("torch") is None:
        return [check_python(), Check("torch", FAIL, "not installed", "pip install torch (CUDA build on GPU machines)")]
    gpus = detect_gpus() if gpus is None else gpus
    needs = Needs.from_config(cfg, cuda=bool(gpus))
    checks = [check_python()]
    checks += check_versions(versions, needs)
    checks += check_known_bad(versions, needs)
    if live_versions and versions.get("transformers") is not None:
        seen = check_transformers_sees_torch()
        checks += [seen] if seen else []
    checks += check_declared_requirements({k: v for k, v in versions.items() if v is not None})
    checks.append(check_tested_combo(versions))
    checks += check_gpus(gpus, needs)
    if versions.get("bitsandbytes") is not None or needs.quantized:
        checks.append(check_bnb_4bit("cuda:0" if gpus else "cpu", needs))
    checks += check_deepspeed(needs, versions)
    checks += check_distributed(needs, len(gpus))
    size = model_bytes(needs.model)
    checks.append(check_disk(needs.output_dir, model_size=size))
    checks.append(check_ram(model_size=size))
    checks += check_paths(needs)
    return checks


def print_report(checks: list[Check], out=print) -> int:
    """One line per check, the fix under each WARN/FAIL; returns the exit code (1 if anything FAILs, else 0)."""
    width = max((len(c.name) for c in checks), default=10)
    for c in checks:
        out(f"{c.status:4s}  {c.name:<{width}s}  {c.detail}")
        if c.fix and c.status != OK:
            out(f"{'':4s}  {'':<{width}s}  fix: {c.fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    out(f"doctor: {fails} failed, {warns} warnings, {len(checks) - fails - warns} ok")
    return 1 if fails else 0


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check packages, GPUs, bitsandbytes, distributed backends, disk and RAM against a config "
                          "(optional), before any weight is read. Exit code 1 if a check fails.")
    parser.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="a YAML config (optional) followed by dotted overrides such as train.precision=fp16")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace) -> int:
    from shardtune.config import load_config, split_config_and_overrides

    path, overrides = split_config_and_overrides(list(args.items))
    cfg = load_config(path, overrides) if (path or overrides) else None
    checks = run_doctor(cfg)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
        return 1 if any(c.status == FAIL for c in checks) else 0
    return print_report(checks)
