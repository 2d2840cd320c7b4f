"""`shardtune doctor`: check packages, GPUs, bitsandbytes, distributed backends, disk and RAM against what a config
needs, before any weight is read. Each check is OK / WARN / FAIL with a one-line fix; FAIL means the run would stop.

Version knowledge lives in the tables below (ranges, tested combinations, known-bad pairs with the reason), plus
every installed package's own declared requirements, so the rules can be read and updated in one place.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from shardtune.hardware import GiB

OK, WARN, FAIL = "OK", "WARN", "FAIL"

# name -> (minimum that works, first version newer than anything tested (None: no ceiling), why the minimum)
VERSION_RANGES: dict[str, tuple[str, Optional[str], str]] = {
    "torch": ("2.4", "3.0", "FSDP2 fully_shard and bitsandbytes' CPU backend need torch >= 2.4"),
    "transformers": ("4.56", "6.0", "shardtune loads models with from_pretrained(dtype=...), added in 4.56"),
    "peft": ("0.17", "1.0", "LoRA on bitsandbytes 4-bit layers with target_modules='all-linear'"),
    "bitsandbytes": ("0.46", "1.0", "CPU 4-bit (NF4/FP4) kernels arrived in 0.46; CUDA needs >= 0.43"),
    "deepspeed": ("0.15", "1.0", "ZeRO-3 with the torch >= 2.4 process groups shardtune creates"),
    "datasets": ("3.0", "6.0", "CSV/Parquet reading through Dataset.from_csv / from_parquet"),
    "accelerate": ("1.0", "2.0", "device_map loading of quantized models in transformers"),
    "safetensors": ("0.4", None, "adapter and merged-model files"),
}
CORE = ("torch", "transformers", "peft", "datasets", "accelerate", "safetensors")



def ci_tested_versions() -> dict[str, str]:
    """What the CI install resolved (assets/tested_versions.json, written from `pip freeze` of that venv), as
    major.minor for the packages doctor checks."""
    from importlib.resources import files
    try:
        pkgs = json.loads((files("shardtune") / "assets" / "tested_versions.json").read_text())["packages"]
    except (OSError, ValueError, KeyError):
        return {}
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "accelerate"):
        v = _v(pkgs, name)
        if v is not None:
            out[name] = f"{v.major}.{v.minor}"
    return out


# Combinations run end to end (tests or GPU benchmarks). Versions are compared by major.minor. Only KNOWN_BAD
# combinations are warned about; a combination that is merely untested is reported as OK with what differs.
TESTED_COMBOS: list[tuple[str, dict[str, str]]] = [
    ("CPU CI", {}),  # filled from assets/tested_versions.json below, so it is what CI really ran
    ("GPU benchmark image", {"torch": "2.11", "transformers": "5.17", "peft": "0.21", "accelerate": "1.15"}),
]


@dataclass(frozen=True)
class KnownBad:
    """A combination that installs but does not work. `applies(versions, needs)` decides; `fix` is the one-liner."""
    what: str
    applies: Callable[[dict, "Needs"], bool]
    fix: str


def _v(versions: dict, name: str) -> Optional[Version]:
    try:
        return Version(versions[name]) if versions.get(name) else None
    except InvalidVersion:
        return None


def _lt(versions: dict, name: str, bound: str) -> bool:
    v = _v(versions, name)
    return v is not None and v.release < Version(bound).release


def _ge(versions: dict, name: str, bound: str) -> bool:
    v = _v(versions, name)
    return v is not None and v.release >= Version(bound).release


KNOWN_BAD: list[KnownBad] = [
    # transformers raises its PyTorch floor over time and then *disables* an older torch with one log line; every
    # model class becomes a stub that fails later. Observed floors: 5.23 (its import_utils), 5.17 (its log message).
    KnownBad("transformers >= 5.23 with torch < 2.6: transformers disables PyTorch below 2.6 (model classes then fail)",
             lambda v, n: _ge(v, "transformers", "5.23") and _lt(v, "torch", "2.6"),
             "pip install 'torch>=2.6' (or an older transformers)"),
    KnownBad("transformers >= 5.17 with torch < 2.5: transformers disables PyTorch below 2.5 (model classes then fail)",
             lambda v, n: _ge(v, "transformers", "5.17") and not _ge(v, "transformers", "5.23")
             and _lt(v, "torch", "2.5"),
             "pip install 'torch>=2.5' (or an older transformers)"),
    KnownBad("bitsandbytes < 0.46 without CUDA: no CPU backend for 4-bit/8-bit layers",
             lambda v, n: n.quantized and not n.cuda and _lt(v, "bitsandbytes", "0.46"),
             "pip install 'bitsandbytes>=0.46'"),
]


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Needs:
    """What a config asks of the environment (all False/None without a config)."""
    quantized: bool = False           # qlora or int8 base (bitsandbytes)
    method: Optional[str] = None
    strategy: Optional[str] = None    # none | ddp | fsdp | deepspeed | auto
    offload: bool = False
    precision: str = "auto"
    device: str = "auto"
    cuda: bool = False                # a CUDA GPU is visible
    output_dir: str = "."
    model: Optional[str] = None
    data: Optional[str] = None
    deepspeed_config: Optional[str] = None
    quant_type: str = "nf4"

    @classmethod
    def from_config(cls, cfg, cuda: bool) -> "Needs":
        if cfg is None:
            return cls(cuda=cuda)
        from shardtune.resolve import resolve_strategy
        p = cfg.parallel
        # doctor runs as one process; the strategy a launch of more ranks resolves to can only differ for auto
        strategy = resolve_strategy(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return cls(quantized=cfg.train.method in ("qlora", "int8"), method=cfg.train.method, strategy=strategy,
                   offload=p.offload_param or p.offload_optimizer, precision=cfg.train.precision,
                   device=cfg.train.device, cuda=cuda, output_dir=cfg.output.dir, model=cfg.model.name_or_path,
                   data=cfg.data.path, deepspeed_config=p.deepspeed_config, quant_type=cfg.quant.quant_type)


# ---------------------------------------------------------------- packages


def installed_versions(names=tuple(VERSION_RANGES)) -> dict[str, Optional[str]]:
    """Distribution versions from package metadata: nothing is imported (importing deepspeed alone takes seconds)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def check_python(version_info=sys.version_info) -> Check:
    v = f"{version_info[0]}.{version_info[1]}.{version_info[2]}"
    if tuple(version_info[:2]) < (3, 10):
        return Check("python", FAIL, f"Python {v}", "use Python >= 3.10 (transformers 5 and shardtune need it)")
    return Check("python", OK, f"Python {v} ({platform.machine()})")


def check_versions(versions: dict[str, Optional[str]], needs: Needs) -> list[Check]:
    """Each package against its range; which packages are required depends on the config."""
    required = set(CORE)
    if needs.quantized:
        required.add("bitsandbytes")
    if needs.strategy == "deepspeed":
        required.add("deepspeed")
    checks = []
    for name, (low, high, why) in VERSION_RANGES.items():
        ver = versions.get(name)
        if ver is None:
            if name in required:
                reason = {"bitsandbytes": f"train.method={needs.method} needs it",
                          "deepspeed": "parallel.strategy=deepspeed needs it"}.get(name, "required")
                checks.append(Check(name, FAIL, f"not installed ({reason})", f"pip install '{name}>={low}'"))
            else:
                use = {"bitsandbytes": "method=qlora / int8", "deepspeed": "parallel.strategy=deepspeed"}.get(name, "")
                checks.append(Check(name, OK if name not in CORE else WARN,
                                    f"not installed (only needed for {use})" if use else "not installed",
                                    f"pip install '{name}>={low}' to use {use}" if use else ""))
            continue
        v = _v(versions, name)
        if v is None:
            checks.append(Check(name, WARN, f"{ver} (unparseable version)", ""))
        elif v.release < Version(low).release:
            status = FAIL if name in required else WARN
            checks.append(Check(name, status, f"{ver} is older than {low}: {why}", f"pip install '{name}>={low}'"))
        elif high and v.release >= Version(high).release:
            # untested is not broken: known breakage is KNOWN_BAD's job, with its reason
            checks.append(Check(name, OK, f"{ver} (newer than the tested range < {high}; not known to break)",
                                f"if something breaks, pip install '{name}<{high}'"))
        else:
            checks.append(Check(name, OK, ver))
    return checks


def check_known_bad(versions: dict, needs: Needs) -> list[Check]:
    return [Check("known-bad combination", FAIL, kb.what, kb.fix) for kb in KNOWN_BAD if kb.applies(versions, needs)]


def check_transformers_sees_torch() -> Optional[Check]:
    """The installed pair as transformers itself judges it: below its PyTorch floor it disables torch silently."""
    try:
        from transformers.utils import import_utils
    except Exception as e:
        return Check("transformers import", FAIL, f"import transformers failed: {type(e).__name__}: {str(e)[:160]}",
                     "pip install -U transformers")
    if not import_utils.is_torch_available():
        return Check("transformers + torch", FAIL, "transformers does not accept the installed torch (it disables "
                                                   "PyTorch and every model class fails)",
                     "pip install -U torch (transformers logs the minimum it needs on import)")
    return None


def unmet_requirements(requires: list[str], versions: dict[str, Optional[str]]) -> list[str]:
    """Declared requirements (Requires-Dist lines) that the installed versions violate; missing ones are skipped
    (pip reports those), extras and environment-marker-excluded lines too."""
    bad = []
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None:
            try:
                if not req.marker.evaluate({"extra": ""}):
                    continue
            except Exception:
                continue
        have = versions.get(req.name.lower()) or versions.get(req.name)
        if have is None or not req.specifier:
            continue
        try:
            if not req.specifier.contains(Version(have), prereleases=True):
                bad.append(f"{req.name}{req.specifier} (installed {have})")
        except InvalidVersion:
            continue
    return bad


def check_declared_requirements(versions: dict[str, Optional[str]]) -> list[Check]:
    """Like `pip check` for the packages shardtune uses: each one's own declared requirements on the others."""
    checks = []
    every = {**versions, **installed_versions(("huggingface-hub", "tokenizers", "numpy", "pyarrow"))}
    for name, ver in versions.items():
        if ver is None:
            continue
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        bad = unmet_requirements(reqs, every)
        if bad:
            checks.append(Check(f"{name} requirements", FAIL, f"{name} {ver} needs {', '.join(bad)}",
                                f"pip install '{bad[0].split(' (')[0]}'"))
    return checks


def check_tested_combo(versions: dict[str, Optional[str]]) -> Check:
    def mm(v):
        parsed = _v({"x": v}, "x") if v else None
        return f"{parsed.major}.{parsed.minor}" if parsed else None

    combos = [(label, combo or ci_tested_versions()) for label, combo in TESTED_COMBOS]
    for label, combo in combos:
        if combo and all(mm(versions.get(k)) == v for k, v in combo.items()):
            return Check("tested combination", OK, f"matches the {label} stack")
    ci = combos[0][1]
    differ = [f"{k} {mm(versions.get(k)) or 'missing'} (CI: {v})" for k, v in ci.items() if mm(versions.get(k)) != v]
    return Check("tested combination", OK, "not the tested stack, no known-bad combination; differs from CI in: "
                 + ", ".join(differ), "report problems with `shardtune doctor` output")


# ---------------------------------------------------------------- GPUs


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: Optional[int] = None

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and newer; V100 (7.0) and T4 (7.5) have no bf16 tensor cores


def detect_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, _ = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free = None
        gpus.append(GpuInfo(i, p.name, (p.major, p.minor), p.total_memory, free))
    return gpus


def check_gpus(gpus: list[GpuInfo], needs: Needs) -> list[Check]:
    from shardtune.resolve import precision_refusal
    if not gpus:
        if needs.device == "cuda":
            return [Check("cuda", FAIL, "train.device=cuda but torch sees no CUDA GPU",
                          "install the CUDA build of torch and check nvidia-smi / CUDA_VISIBLE_DEVICES")]
        checks = [Check("cuda", WARN, "no CUDA GPU visible: training runs on the CPU (fine for the quickstart, "
                                      "slow for real models)",
                        "if this machine has a GPU: install torch's CUDA build (pytorch.org/get-started) and check "
                        "nvidia-smi")]
        bad = precision_refusal(needs.precision, on_gpu=False)
        if bad:
            checks.append(Check("precision", FAIL, *bad))
        return checks
    checks = []
    for g in gpus:
        free = f", {g.free_bytes / GiB:.1f} GiB free" if g.free_bytes is not None else ""
        checks.append(Check(f"cuda:{g.index}", OK, f"{g.name}, {g.total_bytes / GiB:.1f} GiB{free}, compute "
                                                   f"capability {g.capability[0]}.{g.capability[1]}, "
                                                   f"bf16 {'yes' if g.bf16 else 'no'}"))
    names = {g.name for g in gpus}
    if len(names) > 1:
        checks.append(Check("gpu mix", WARN, f"different GPUs: {', '.join(sorted(names))}; sharding is balanced by "
                                              f"parameter count, so the smallest GPU sets the limit",
                            "set CUDA_VISIBLE_DEVICES to one kind of GPU"))
    no_bf16 = [g for g in gpus if not g.bf16]
    if no_bf16:
        which = ", ".join(sorted({g.name for g in no_bf16}))
        bad = precision_refusal(needs.precision, on_gpu=True, gpu_bf16=False, gpu_name=which)
        if bad:
            checks.append(Check("precision", FAIL, *bad))
        else:
            checks.append(Check("precision", OK, f"{which}: no bf16; precision {needs.precision} -> fp16 with loss "
                                                 f"scaling" if needs.precision == "auto" else
                                f"{which}: no bf16; train.precision={needs.precision}"))
    return checks


# ---------------------------------------------------------------- bitsandbytes, deepspeed, distributed


def check_bnb_4bit(device: str, needs: Needs) -> Check:
    """Quantize a small Linear to 4 bits on `device` and run it: proves the kernels load and compute correctly."""
    status_on_fail = FAIL if needs.quantized else WARN
    name = f"bitsandbytes 4-bit on {device}"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as e:
        return Check(name, status_on_fail, f"cannot import bitsandbytes ({type(e).__name__}: {str(e)[:120]})",
                     "pip install 'bitsandbytes>=0.46' (built for this CUDA / CPU)")
    try:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 64, generator=gen) * 0.05
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type=needs.quant_type)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=needs.quant_type)
        layer = layer.to(device)
        x = torch.randn(4, 64, generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            y = layer(x).float()
            deq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            ref = x.float() @ deq.t()
            full = x.float() @ w.to(device).t()
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite output")
        err_kernel = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        err_quant = (ref - full).norm().item() / max(full.norm().item(), 1e-6)
        if err_kernel > 0.02 or err_quant > 0.2:
            raise RuntimeError(f"wrong result (kernel error {err_kernel:.3f}, quantization error {err_quant:.3f})")
    except Exception as e:
        return Check(name, status_on_fail, f"a {needs.quant_type} Linear4bit failed: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                     "reinstall bitsandbytes for this torch/CUDA (pip install -U bitsandbytes), or use "
                     "train.method=lora")
    return Check(name, OK, f"{needs.quant_type} Linear4bit forward matches its dequantized weight "
                           f"(quantization error {err_quant:.1%})")


def check_deepspeed(needs: Needs, versions: dict) -> list[Check]:
    if needs.strategy != "deepspeed":
        return []
    checks = []
    if versions.get("deepspeed") is not None:
        if not needs.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # otherwise deepspeed probes for CUDA and warns
        try:
            import deepspeed  # noqa: F401
            checks.append(Check("deepspeed import", OK, f"deepspeed {deepspeed.__version__} imports"))
        except Exception as e:
            checks.append(Check("deepspeed import", FAIL, f"import deepspeed failed: {type(e).__name__}: "
                                                          f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                                "DS_BUILD_OPS=0 pip install --no-build-isolation --force-reinstall deepspeed "
                                "(built against the installed torch)"))
    if needs.deepspeed_config:
        p = Path(needs.deepspeed_config)
        try:
            json.loads(p.read_text())
            checks.append(Check("deepspeed config", OK, str(p)))
        except OSError:
            checks.append(Check("deepspeed config", FAIL, f"parallel.deepspeed_config '{p}' not found",
                                "pass the path of your ds_config.json"))
        except json.JSONDecodeError as e:
            checks.append(Check("deepspeed config", FAIL, f"'{p}' is not valid JSON (line {e.lineno}: {e.msg})",
                                "fix the JSON"))
    return checks


def check_distributed(needs: Needs, n_gpus: int) -> list[Check]:
    import torch.distributed as dist

    if not dist.is_available():
        status = FAIL if needs.strategy in ("ddp", "fsdp", "deepspeed") else WARN
        return [Check("torch.distributed", status, "this torch build has no torch.distributed",
                      "install an official torch wheel")]
    nccl, gloo = dist.is_nccl_available(), dist.is_gloo_available()
    detail = f"nccl {'yes' if nccl else 'no'}, gloo {'yes' if gloo else 'no'}"
    multi = needs.strategy in ("ddp", "fsdp", "deepspeed")
    if n_gpus and not nccl:
        return [Check("distributed backends", FAIL if multi else WARN, detail + " (GPUs need NCCL for several "
                                                                              "processes)",
                      "install the CUDA build of torch, which bundles NCCL")]
    if not n_gpus and not gloo:
        return [Check("distributed backends", FAIL if multi else WARN, detail + " (CPU ranks need gloo)",
                      "install an official torch wheel (gloo is built in)")]
    if n_gpus and nccl:
        try:
            import torch.cuda.nccl as tnccl
            detail += f" (NCCL {'.'.join(map(str, tnccl.version()))})"
        except Exception:
            pass
    return [Check("distributed backends", OK, detail)]


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
