"""Bad input gets one line that names the thing and the fix, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations

import json

import pytest

from shardtune.cli import main
from shardtune.config import load_config
from shardtune.errors import ConfigError, EnvironmentProblem


def _run(capsys, *argv):
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _write_model(dir_, config: dict):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps(config))
    return dir_


def test_unknown_key_suggests(capsys):
    _one_line_error(*_run(capsys, "config", "show", "lora.rnak=3"), "unknown key 'lora.rnak'", "did you mean 'lora.rank'")


def test_bad_value_names_key_value_and_allowed(capsys):
    _one_line_error(*_run(capsys, "config", "show", "train.method=qlorra"), "train.method", "qlorra", "qlora")


def test_negative_fsdp_layers_per_unit_is_refused(capsys):
    _one_line_error(*_run(capsys, "config", "show", "parallel.fsdp_layers_per_unit=-1"),
                    "parallel.fsdp_layers_per_unit", "-1", "0 (auto)")


def test_config_show_resolves_defaults_and_overrides(capsys):
    assert main(["config", "show", "lora.r=32", "train.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert "rank: 32" in out and "lr: 0.0001" in out and "micro_batch_size: 4" in out


def test_malformed_yaml_names_line(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 1e-4\n  method: [qlora\n")
    _one_line_error(*_run(capsys, "config", "show", str(p)), "bad.yaml:", "not valid YAML")


def test_missing_config_file(capsys):
    _one_line_error(*_run(capsys, "train", "nope.yaml"), "nope.yaml", "not found")


def test_model_dir_without_config_json(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    _one_line_error(*_run(capsys, "train", f"model.name_or_path={tmp_path / 'm'}"), "no config.json")


def test_missing_model_path(tmp_path, capsys):
    _one_line_error(*_run(capsys, "train", f"model.name_or_path={tmp_path / 'absent'}"), "does not exist")


def test_unsupported_architecture(tmp_path, capsys):
    d = _write_model(tmp_path / "vit", {"model_type": "vit"})
    _one_line_error(*_run(capsys, "train", f"model.name_or_path={d}"), "'vit'", "not a causal LM")


def test_remote_code_needs_flag(tmp_path, capsys):
    d = _write_model(tmp_path / "custom", {"model_type": "mycustomlm",
                                           "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    _one_line_error(*_run(capsys, "train", f"model.name_or_path={d}"), "model.trust_remote_code=true")


@pytest.mark.parametrize("method,label", [("gptq", "GPTQ"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes")])
def test_prequantized_checkpoint(tmp_path, capsys, method, label):
    d = _write_model(tmp_path / method, {"model_type": "llama", "quantization_config": {"quant_method": method}})
    line = _one_line_error(*_run(capsys, "train", f"model.name_or_path={d}"), f"pre-quantized {label}")
    assert "original bf16" in line


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(Exception, match="no config.json"):
        main(["--debug", "train", f"model.name_or_path={tmp_path / 'm'}"])


def test_half_precision_on_cpu_is_an_error():
    from shardtune.model.load import resolve_precision
    import torch
    with pytest.raises(EnvironmentProblem, match="train.precision=fp32"):
        resolve_precision(load_config(None, ["train.precision=bf16"]).train, torch.device("cpu"))


def test_bf16_on_gpu_without_bf16_says_use_fp16(monkeypatch):
    import torch
    from shardtune.model.load import resolve_precision
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-32GB")
    tcfg = load_config(None, ["train.precision=bf16"]).train
    with pytest.raises(EnvironmentProblem, match="V100.*train.precision=fp16"):
        resolve_precision(tcfg, torch.device("cuda", 0))
    assert resolve_precision(load_config(None, []).train, torch.device("cuda", 0)) == torch.float16


def test_8bit_optimizer_on_cpu_is_an_error():
    import torch
    from shardtune.train.optim import build_optimizer
    with pytest.raises(EnvironmentProblem, match="train.optimizer=adamw"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], load_config(None, ["train.optimizer=adamw_8bit"]).train,
                        torch.device("cpu"))


def test_strategy_none_with_many_ranks_is_an_error():
    from shardtune.parallel import resolve_strategy
    with pytest.raises(ConfigError, match="parallel.strategy=ddp"):
        resolve_strategy(load_config(None, ["parallel.strategy=none"]), 2)


def test_auto_strategy_follows_a_deepspeed_json():
    from shardtune.parallel import resolve_strategy
    assert resolve_strategy(load_config(None, ["parallel.deepspeed_config=ds.json"]), 2) == "deepspeed"
    assert resolve_strategy(load_config(None, []), 2) == "fsdp"
    assert resolve_strategy(load_config(None, []), 1) == "none"


@pytest.mark.parametrize("phase", ["setup", "step"])
def test_out_of_gpu_memory_is_one_line_exit_5_and_keeps_the_run(capsys, monkeypatch, tmp_path, tiny_model,
                                                                 alpaca_file, phase):
    """A CUDA out-of-memory (the commonest failure) is one line: where, torch's own figures, how to find what fits,
    the last complete checkpoint; exit 5, no traceback; nothing in output.dir is removed."""
    import torch

    from shardtune.train.loop import Trainer
    from support import run_overrides
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity of "
                                 "23.99 GiB of which 1.2 GiB is free.\nmore lines")
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def boom(self, *a, **k):
        raise oom
    monkeypatch.setattr(Trainer, "setup" if phase == "setup" else "_run", boom)
    argv = ["train", *run_overrides(tiny_model("llama"), alpaca_file, out, **{"output.overwrite": True})]
    rc, err = _run(capsys, *argv)
    assert rc == 5 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert "out of GPU memory" in line and "Tried to allocate 3.91 GiB" in line and "more lines" not in line
    assert ("while loading" in line) == (phase == "setup") and "shardtune plan" in line
    assert "last complete checkpoint: none" in line
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(Exception):
        main([*argv, "--debug"])


def test_out_of_gpu_memory_outside_training_is_one_line(capsys, monkeypatch):
    """evaluate / generate / export: a CUDA out-of-memory is one line and exit 5 as well; other RuntimeErrors are
    bugs and keep their traceback."""
    import torch

    import shardtune.cli as cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")
    monkeypatch.setattr(cli, "cmd_config", oom)
    rc, err = _run(capsys, "config", "show")
    assert rc == 5 and "Traceback" not in err
    assert err.startswith("error: out of GPU memory in `shardtune config`") and "Tried to allocate 1.00 GiB" in err

    def bug(args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "cmd_config", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["config", "show"])
