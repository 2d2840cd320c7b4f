"""The package map, enforced: every import in shardtune/ (module level, function-local, relative, and
importlib.import_module with a literal name) must run down the layers of docs/architecture.md ("Package map"),
and no file in shardtune/ may exceed 500 lines.

A module may import its own package and packages of a lower layer. Packages of the same layer do not import each
other unless SIBLING_EDGES names the pair with its reason; DISJOINT pairs never import each other in either
direction. A new top-level module or package must be given a layer here (and a row in the docs table).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "shardtune"
MAX_LINES = 500

# Higher imports lower. cli -> train/export/eval/doctor -> parallel -> plan/data -> model -> resolve
# -> builtin/config/hardware -> leaf utilities -> errors.
LAYERS = {
    "shardtune": 0,  # the package root: only __version__, imports nothing
    "errors": 0,
    "jsonfile": 1, "quiet": 1, "aliases": 1, "threads": 1,  # leaf utilities
    "config": 2, "hardware": 2, "builtin": 2,
    "resolve": 3,  # decisions (strategy, precision, loss path) shared by model, plan, parallel, train, doctor
    "model": 4,
    "plan": 5, "data": 5,
    "parallel": 6,
    "train": 7, "export": 7, "eval": 7, "doctor": 7,
    "cli": 8,
}
SIBLING_EDGES = {
    ("eval", "export"): "evaluation generates with export.generate and loads runs with export.adapter",
}
DISJOINT = {
    frozenset({"model", "data"}): "what both need (tiny model, toy corpus, chat templates) lives in builtin/",
}


def package_of(module: str) -> str:
    """'shardtune.model.load' -> 'model'; 'shardtune.cli' -> 'cli'; 'shardtune' -> 'shardtune'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every shardtune import in `source`, wherever it sits in the file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = here[:len(here) - (node.level - 1)]
                if not node.module:  # `from . import formats` names modules of that package
                    found += [(node.lineno, ".".join(base + [a.name])) for a in node.names]
                    continue
                target = ".".join(base + [node.module])
            else:
                target = node.module or ""
            if target == "shardtune":  # `from shardtune import model` imports the subpackage
                found += [(node.lineno, f"shardtune.{a.name}") for a in node.names
                          if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file()]
                continue
            found.append((node.lineno, target))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "shardtune" or name.startswith("shardtune.")]


def violation(src_pkg: str, dst_pkg: str) -> str | None:
    """Why `src_pkg` may not import `dst_pkg`, or None when it may."""
    if src_pkg == dst_pkg:
        return None
    for pkg in (src_pkg, dst_pkg):
        if pkg not in LAYERS:
            return f"'{pkg}' has no layer; add it to LAYERS in tests/test_import_direction.py and the package map"
    pair = frozenset({src_pkg, dst_pkg})
    if pair in DISJOINT:
        return f"{src_pkg} and {dst_pkg} never import each other: {DISJOINT[pair]}"
    src, dst = LAYERS[src_pkg], LAYERS[dst_pkg]
    if dst < src or (src_pkg, dst_pkg) in SIBLING_EDGES:
        return None
    if dst == src:
        return f"{src_pkg} and {dst_pkg} share a layer; siblings do not import each other"
    may = sorted(p for p, layer in LAYERS.items() if layer < src)
    return f"{dst_pkg} is above {src_pkg} (layer {dst} > {src}); {src_pkg} may import: {', '.join(may)}"


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        src_pkg = package_of(module)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            why = violation(src_pkg, package_of(target))
            if why:
                out.append(f"{path.relative_to(root.parent)}:{line} imports {target}: {why}")
    return out


# ------------------------------------------------------------------------------------------------ the checker

def test_function_local_relative_and_dynamic_imports_are_all_seen():
    src = ("import os\nfrom . import formats\nfrom ..model.load import x\n"
           "def f():\n    from shardtune.train import loop\n    import shardtune.cli\n"
           "    importlib.import_module('shardtune.export.merge')\n")
    got = imported_modules(src, "shardtune.data.pipeline")
    assert got == [(2, "shardtune.data.formats"), (3, "shardtune.model.load"), (5, "shardtune.train"),
                   (6, "shardtune.cli"), (7, "shardtune.export.merge")]
    assert imported_modules("from .load import y\n", "shardtune.model", is_package=True) == [
        (1, "shardtune.model.load")]


@pytest.mark.parametrize("src, dst", [
    ("parallel", "train"), ("model", "data"), ("model", "parallel"), ("data", "model"), ("builtin", "model"),
    ("builtin", "data"), ("plan", "parallel"), ("plan", "train"), ("train", "cli"), ("errors", "config"),
    ("plan", "data"), ("export", "eval"), ("model", "unheard_of"),
])
def test_forbidden_directions_are_reported(src, dst):
    assert violation(src, dst)


@pytest.mark.parametrize("src, dst", [
    ("cli", "train"), ("train", "parallel"), ("parallel", "model"), ("plan", "model"), ("data", "builtin"),
    ("model", "builtin"), ("model", "resolve"), ("resolve", "config"), ("eval", "export"), ("model", "model"),
    ("config", "errors"), ("doctor", "shardtune"),
])
def test_allowed_directions_pass(src, dst):
    assert violation(src, dst) is None


def test_a_planted_upward_import_fails(tmp_path):
    pkg = tmp_path / "shardtune"
    (pkg / "parallel").mkdir(parents=True)
    (pkg / "parallel" / "fsdp.py").write_text("def f():\n    from shardtune.train.loop import train\n")
    (pkg / "model.py").write_text("from shardtune.errors import ModelError\n")
    assert violations(pkg) == ["shardtune/parallel/fsdp.py:2 imports shardtune.train.loop: train is above "
                               "parallel (layer 7 > 6); parallel may import: aliases, builtin, config, data, "
                               "errors, hardware, jsonfile, model, plan, quiet, resolve, shardtune, threads"]


# ------------------------------------------------------------------------------------------------ the package

def test_every_package_has_a_layer():
    pkgs = {package_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert not sorted(pkgs - set(LAYERS))


def test_imports_run_down_the_layers():
    bad = violations()
    assert not bad, f"{len(bad)} import(s) against the package map:\n" + "\n".join(bad)


def test_no_module_exceeds_500_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (limit {MAX_LINES} lines): {long}"
