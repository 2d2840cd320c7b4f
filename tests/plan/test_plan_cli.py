"""`shardtune plan`: the per-GPU table, --json, --auto, does-not-fit exit codes, bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from shardtune.plan import command


def run_plan(argv, capsys):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    rc = command.run(p.parse_args(argv))
    return rc, capsys.readouterr().out


def test_table_has_every_component_and_the_verdict(capsys):
    rc, out = run_plan(["--model", "llama-3-8b", "--gpus", "1xH100", "--seq", "2048", "--micro-batch", "2",
                        "--grad-ckpt", "on"], capsys)
    assert rc == 0
    for word in ("weights: 4-bit data", "weights: quant constants", "LoRA weights", "optimizer states",
                 "activations", "peak allocated", "peak reserved", "CUDA context", "CPU RAM per node",
                 "load-time peak", "FITS", "tokens/s", "MFU"):
        assert word in out, word


def test_json_is_machine_readable_and_consistent(capsys):
    rc, out = run_plan(["--model", "Qwen2.5-7B", "--gpus", "2xA100-80GB", "--strategy", "zero3", "--method", "lora",
                        "--seq", "1024", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["fits"] is True
    assert d["setup"]["strategy"] == "deepspeed" and d["setup"]["zero_stage"] == 3 and d["setup"]["world_size"] == 2
    mem = d["memory"]
    assert sum(mem["gpu"].values()) == pytest.approx(mem["device_total"], abs=16)
    assert mem["peak_reserved"] >= mem["peak_allocated"] > 0
    assert d["speed"]["tokens_per_s"] > 0 and d["model"]["name"] == "Qwen2.5-7B"


def test_does_not_fit_exits_1_with_suggestions(capsys):
    rc, out = run_plan(["--model", "llama-2-70b", "--gpus", "1x24GB", "--method", "full", "--json"], capsys)
    d = json.loads(out)
    assert rc == 1 and d["fits"] is False and d["why_not"] and d["suggestions"]


def test_auto_json_names_best_runner_up_and_overrides(capsys):
    rc, out = run_plan(["--model", "llama-2-70b", "--gpus", "8xV100-32GB", "--seq", "2048", "--auto", "--json"],
                       capsys)
    d = json.loads(out)   # one shape with and without --auto: the chosen estimate at the top, `auto` added
    assert rc == 0 and d["fits"] and d["fits_with_margin"] and d["setup"]["precision"] == "fp16"   # V100: no bf16
    a = d["auto"]
    assert a["found"] and a["runner_up"] and a["rejected"] and all(r["reason"] for r in a["rejected"])
    assert "parallel.strategy=" + d["setup"]["strategy"] in d["overrides"]


def test_auto_text_and_config_file_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  name_or_path: CodeLlama-13B\ntrain:\n  method: lora\ndata:\n  max_seq_len: 2048\n"
                   "plan:\n  mode: auto\n  gpus: 3xRTX3090\n")
    rc, out = run_plan([str(cfg), "lora.rank=8"], capsys)
    assert rc == 0 and "auto plan" in out and "chosen" in out and "run it with" in out


def test_through_the_shardtune_command(capsys):
    from shardtune.cli import main
    assert main(["plan", "--model", "builtin:tiny-llama", "--gpus", "1x8GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["hidden"] == 128
    assert main(["plan", "--model", "llama-3-8b", "--gpus", "8xNoSuchGPU"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'NoSuchGPU'" in err and err.count("\n") == 1
    assert main(["plan", "--model", "no-such-model-7b", "--gpus", "1xH100"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model-7b" in err and "Llama-3-8B" in err


def test_json_has_one_shape_with_and_without_auto(capsys):
    argv = ["--model", "llama-3-8b", "--gpus", "1xH100", "--seq", "2048", "--micro-batch", "2", "--json"]
    _, manual = run_plan(argv, capsys)
    _, auto = run_plan(argv + ["--auto"], capsys)
    m, a = json.loads(manual), json.loads(auto)
    assert set(a) - set(m) == {"auto"} and set(m) <= set(a)
    assert set(m["memory"]) == set(a["memory"]) and set(m["setup"]) == set(a["setup"])


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_does_not_fit_is_exit_1_in_every_mode(capsys, json_flag):
    base = ["--model", "llama-2-70b", "--gpus", "1x16GB", "--method", "full"]
    assert run_plan(base + json_flag, capsys)[0] == 1
    rc, out = run_plan(base + ["--auto"] + json_flag, capsys)
    assert rc == 1 and "does not fit" in out
    if json_flag:
        d = json.loads(out)
        assert d["auto"]["found"] is False and d["auto"]["error"] and d["suggestions"]


def test_the_margin_marks_tight_instead_of_flipping_the_verdict(capsys):
    """A setup within the device but inside the margin fits (exit 0), marked tight with its headroom; auto does
    not pick it."""
    from shardtune.config import load_config
    from shardtune.hardware import parse_gpus
    from shardtune.plan import estimate
    cfg = load_config(None, ["model.name_or_path=llama-3-8b", "data.max_seq_len=2048", "train.micro_batch_size=1",
                             "train.gradient_checkpointing=true"])
    reserved = estimate(cfg, parse_gpus("1xH100")).memory.peak_reserved   # what counts against a per-process cap
    gib = reserved / 2 ** 30 / 0.95       # a cap with the peak at 95% of it: inside the 10% margin
    est = estimate(cfg, parse_gpus(f"1xH100@{gib:.3f}GB"))
    assert est.fits and est.tight and not est.fits_with_margin
    assert 0 < est.headroom_bytes < 0.1 * est.memory.budget
    rc, out = run_plan(["--model", "llama-3-8b", "--gpus", f"1xH100@{gib:.3f}GB", "--seq", "2048", "--micro-batch",
                        "1", "--grad-ckpt", "on"], capsys)
    assert rc == 0 and "FITS, TIGHT" in out and "GiB free per GPU" in out
