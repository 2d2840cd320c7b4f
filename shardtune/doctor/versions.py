"""Package versions: the ranges shardtune needs, the combinations CI tested, known-bad pairs with the reason, and every
installed package's own declared requirements."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from shardtune.doctor.checks import FAIL, OK, WARN, Check, Needs

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
