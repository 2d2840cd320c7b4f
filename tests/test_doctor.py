"""`shardtune doctor`: version rules, GPU and precision rules, the live bitsandbytes probe, report and CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from shardtune import doctor as d
from shardtune.config import load_config

GOOD = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
        "deepspeed": "0.19.8", "datasets": "5.2.0", "accelerate": "1.16.0", "safetensors": "0.8.0"}
V100 = d.GpuInfo(0, "Tesla V100-SXM2-32GB", (7, 0), 32 * d.GiB, 31 * d.GiB)
A100 = d.GpuInfo(0, "NVIDIA A100-SXM4-80GB", (8, 0), 80 * d.GiB, 79 * d.GiB)


def _by_name(checks):
    return {c.name: c for c in checks}


def _needs(*overrides, cuda=False):
    return d.Needs.from_config(load_config(None, list(overrides)), cuda=cuda)


def test_this_machine_passes():
    checks = d.run_doctor(None)
    names = _by_name(checks)
    assert {"python", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "cuda",
            "distributed backends", "disk", "cpu ram"} <= set(names)
    probe = [c for c in checks if c.name.startswith("bitsandbytes 4-bit on")]
    assert len(probe) == 1 and probe[0].status == d.OK  # the live NF4 Linear4bit forward
    assert not [c for c in checks if c.status == d.FAIL], [c for c in checks if c.status == d.FAIL]
    assert d.check_transformers_sees_torch() is None  # transformers accepts this torch


def test_version_ranges_depend_on_what_the_config_needs():
    old = {**GOOD, "torch": "2.3.1"}
    assert _by_name(d.check_versions(old, _needs()))["torch"].status == d.FAIL
    no_bnb = {**GOOD, "bitsandbytes": None}
    c = _by_name(d.check_versions(no_bnb, _needs("train.method=qlora")))["bitsandbytes"]
    assert c.status == d.FAIL and "pip install" in c.fix
    assert _by_name(d.check_versions(no_bnb, _needs("train.method=lora")))["bitsandbytes"].status == d.OK
    no_ds = {**GOOD, "deepspeed": None}
    assert _by_name(d.check_versions(no_ds, _needs("parallel.strategy=deepspeed")))["deepspeed"].status == d.FAIL
    assert _by_name(d.check_versions(no_ds, _needs("parallel.strategy=fsdp")))["deepspeed"].status == d.OK
    newer = _by_name(d.check_versions({**GOOD, "transformers": "6.1.0"}, _needs()))["transformers"]
    assert newer.status == d.OK and "not known to break" in newer.detail  # untested is not a warning


def test_known_bad_combinations():
    bad = d.check_known_bad({**GOOD, "torch": "2.5.1"}, _needs())
    assert len(bad) == 1 and bad[0].status == d.FAIL and "torch>=2.6" in bad[0].fix
    assert "torch>=2.5" in d.check_known_bad({**GOOD, "transformers": "5.17.0", "torch": "2.4.1"}, _needs())[0].fix
    assert d.check_known_bad({**GOOD, "transformers": "5.17.0", "torch": "2.5.1"}, _needs()) == []
    assert d.check_known_bad(GOOD, _needs()) == []
    old_bnb = {**GOOD, "bitsandbytes": "0.45.5"}
    assert d.check_known_bad(old_bnb, _needs("train.method=qlora", cuda=False))
    assert not d.check_known_bad(old_bnb, _needs("train.method=qlora", cuda=True))


def test_tested_combinations_are_recognised():
    assert d.check_tested_combo(GOOD).detail == "matches the CPU CI stack"
    gpu = {**GOOD, "torch": "2.11.0", "transformers": "5.17.1", "peft": "0.21.0", "accelerate": "1.15.0"}
    assert "GPU benchmark" in d.check_tested_combo(gpu).detail
    other = d.check_tested_combo({**GOOD, "transformers": "5.0.0"})
    assert other.status == d.OK and "transformers 5.0 (CI: 5.24)" in other.detail


def test_tested_versions_are_what_this_install_resolved():
    """assets/tested_versions.json is `pip freeze` of the CI venv: the installed packages here (installed like CI)
    match it, so doctor right after the README's install says the stack is the tested one."""
    from importlib.metadata import version
    tested = d.ci_tested_versions()
    assert {"torch", "transformers", "peft", "bitsandbytes", "deepspeed"} <= set(tested)
    assert d.check_tested_combo(d.installed_versions()).detail == "matches the CPU CI stack", \
        {k: version(k) for k in tested}
    assert not [c for c in d.run_doctor(None) if c.status == d.WARN and c.name != "cuda"]


def test_declared_requirements_are_checked():
    reqs = ["transformers>=99", "torch<3,>=2.4", "pytest; extra == 'test'", "numpy"]
    assert d.unmet_requirements(reqs, GOOD) == ["transformers>=99 (installed 5.24.0)"]
    assert d.check_declared_requirements({k: v for k, v in GOOD.items()}) == []


def test_v100_has_no_bf16():
    c = _by_name(d.check_gpus([V100], _needs("train.precision=bf16", cuda=True)))["precision"]
    assert c.status == d.FAIL and "train.precision=fp16" in c.fix
    auto = _by_name(d.check_gpus([V100], _needs("train.precision=auto", cuda=True)))["precision"]
    assert auto.status == d.OK and "fp16" in auto.detail
    assert "precision" not in _by_name(d.check_gpus([A100], _needs("train.precision=bf16", cuda=True)))
    mixed = _by_name(d.check_gpus([A100, d.GpuInfo(1, V100.name, (7, 0), V100.total_bytes)], _needs(cuda=True)))
    assert mixed["gpu mix"].status == d.WARN and mixed["cuda:1"].status == d.OK


def test_cpu_rules():
    assert _by_name(d.check_gpus([], _needs("train.device=cuda")))["cuda"].status == d.FAIL
    c = _by_name(d.check_gpus([], _needs("train.precision=bf16")))
    assert c["cuda"].status == d.WARN and c["precision"].status == d.FAIL


def test_disk_ram_and_paths(tmp_path):
    assert d.check_disk(str(tmp_path / "not" / "yet"), free_bytes=100 * d.GiB).status == d.OK
    assert d.check_disk(str(tmp_path), free_bytes=d.GiB // 2).status == d.FAIL
    assert d.check_disk(str(tmp_path), free_bytes=20 * d.GiB, model_size=40 * d.GiB).status == d.WARN
    assert d.check_ram(available=64 * d.GiB, total=128 * d.GiB, model_size=16 * d.GiB).status == d.OK
    assert d.check_ram(available=8 * d.GiB, total=16 * d.GiB, model_size=16 * d.GiB).status == d.WARN
    paths = _by_name(d.check_paths(_needs(f"model.name_or_path={tmp_path / 'nope'}", "data.path=missing.jsonl")))
    assert paths["model"].status == d.FAIL and paths["data"].status == d.FAIL


def test_bnb_probe_reports_a_broken_kernel(monkeypatch):
    import bitsandbytes as bnb

    def broken(self, x):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", broken)
    c = d.check_bnb_4bit("cpu", _needs("train.method=qlora"))
    assert c.status == d.FAIL and "no kernel image" in c.detail and c.fix
    assert d.check_bnb_4bit("cpu", _needs("train.method=lora")).status == d.WARN


def test_report_exit_code_and_fix_lines():
    lines = []
    assert d.print_report([d.Check("a", d.OK, "fine"), d.Check("b", d.WARN, "hmm", "do x")], out=lines.append) == 0
    assert any("fix: do x" in ln for ln in lines)
    assert d.print_report([d.Check("c", d.FAIL, "broken", "do y")], out=lines.append) == 1


def test_cli(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the bf16-on-CPU rule is checked on CPU-only machines")
    parser = argparse.ArgumentParser()
    d.add_arguments(parser)
    assert d.run(parser.parse_args(["train.precision=bf16", "--json"])) == 1  # bf16 on this CPU-only machine
    checks = json.loads(capsys.readouterr().out)
    assert any(c["name"] == "precision" and c["status"] == "FAIL" for c in checks)
    with pytest.raises(Exception, match="unexpected argument"):
        d.run(parser.parse_args(["a.yaml", "b.yaml"]))
