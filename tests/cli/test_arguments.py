"""Arguments as people type them: options among positionals, other trainers' spellings, defaults that match
`config show`, range checks, and lines printed once."""

from __future__ import annotations

import pytest
import yaml

from shardtune import cli
from shardtune.config import dump_yaml, load_config


def _err(capsys, *argv) -> str:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def captured_train(monkeypatch):
    """cmd_train up to the point where it would train: returns the config it would train, and the relaunch argv."""
    seen = {}

    class Res:
        eval_losses = [(0, 5.0), (10, 2.0)]
        output_dir = "runs/x"

    def fake_train(cfg):
        seen["cfg"] = cfg
        return Res()

    def fake_relaunch(argv, **kw):
        seen["relaunch"] = (argv, kw)
        return 0

    import shardtune.parallel.launch as launch
    import shardtune.train.loop as loop
    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(launch, "relaunch", fake_relaunch)
    for k in ("WORLD_SIZE", "RANK", cli.LAUNCHED_ENV):
        monkeypatch.delenv(k, raising=False)
    return seen


@pytest.mark.parametrize("argv", [
    ["train", "cfg.yaml", "--nproc", "2", "train.max_steps=10"],
    ["train", "--nproc", "2", "cfg.yaml", "train.max_steps=10"],
    ["train", "cfg.yaml", "train.max_steps=10", "--nproc=2"],
    ["--debug", "train", "cfg.yaml", "--nproc", "2", "train.max_steps=10"],
])
def test_options_anywhere_among_positionals(argv):
    args = cli.parse(argv)
    assert args.command == "train" and args.nproc == 2
    assert args.items == ["cfg.yaml", "train.max_steps=10"]
    assert args.debug == (argv[0] == "--debug")


def test_relaunch_gets_the_items_whatever_their_order(tmp_path, captured_train, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_steps: 3\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--nproc", "2", "c.yaml", "train.lr=1e-3"]) == 0
    argv, kw = captured_train["relaunch"]
    assert argv == ["c.yaml", "train.lr=1e-3"] and kw["nproc"] == 2


@pytest.mark.parametrize("argv,spelling", [
    (["train", "--max_steps", "10"], "train.max_steps=10"),
    (["train", "--max-steps=10"], "train.max_steps=10"),
    (["train", "--learning_rate", "1e-4"], "train.lr=1e-4"),
    (["train", "--per_device_train_batch_size", "2"], "train.micro_batch_size=2"),
    (["train", "--gradient_accumulation_steps", "4"], "train.grad_accum=4"),
    (["train", "--num_train_epochs", "3"], "train.epochs=3"),
    (["train", "--output_dir", "out"], "output.dir=out"),
    (["train", "--report_to", "wandb"], "output.report_to=wandb"),
    (["train", "--deepspeed", "ds.json"], "parallel.deepspeed_config=ds.json"),
    (["train", "--lora_r", "8"], "lora.rank=8"),
    (["train", "--lora_alpha", "16"], "lora.alpha=16"),
    (["train", "--resume_from_checkpoint"], "train.resume=true"),
    (["train", "--load_in_4bit"], "train.method=qlora"),
    (["train", "--config", "x.yaml"], "shardtune train x.yaml"),
    (["config", "show", "--warmup_steps", "3"], "train.warmup_steps=3"),
    (["train", "--seq", "512"], "see shardtune train --help"),
])
def test_other_trainers_options_get_the_shardtune_spelling(capsys, argv, spelling):
    line = _err(capsys, *argv)
    assert f"unknown option '{argv[-2] if '=' not in argv[-1] and argv[-1][0] != '-' else argv[-1].split('=')[0]}'" \
        in line and spelling in line, line


@pytest.mark.parametrize("override,key,value", [
    ("learning_rate=1e-4", "train.lr", 1e-4),
    ("per_device_train_batch_size=2", "train.micro_batch_size", 2),
    ("gradient_accumulation_steps=4", "train.grad_accum", 4),
    ("num_train_epochs=2", "train.epochs", 2.0),
    ("report_to=wandb", "output.report_to", ["wandb"]),
    ("report_to=none", "output.report_to", []),
    ("output_dir=out", "output.dir", "out"),
    ("lora_r=8", "lora.rank", 8),
    ("lora_alpha=16", "lora.alpha", 16.0),
    ("deepspeed=ds.json", "parallel.deepspeed_config", "ds.json"),
    ("load_in_4bit=true", "train.method", "qlora"),
    ("resume_from_checkpoint=true", "train.resume", True),
])
def test_well_known_names_are_aliases(override, key, value):
    notes = []
    cfg = load_config(None, [override], notes)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    assert len(notes) == 1 and key in notes[0]


def test_the_earlier_tensorboard_switch_still_works():
    assert load_config(None, ["output.tensorboard=false"]).output.report_to == []
    assert load_config(None, ["output.report_to=wandb", "output.tensorboard=true"]).output.report_to == [
        "tensorboard", "wandb"]


def test_aliases_in_a_yaml(tmp_path):
    p = tmp_path / "hf.yaml"
    p.write_text("learning_rate: 3.0e-4\ngradient_accumulation_steps: 2\nreport_to: [tensorboard, mlflow]\n"
                 "train:\n  max_steps: 7\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.grad_accum, cfg.train.max_steps) == (3e-4, 2, 7)
    assert cfg.output.report_to == ["tensorboard", "mlflow"]


@pytest.mark.parametrize("override,needle", [
    ("resume_from_checkpoint=runs/x/checkpoint-20", "train.resume=true"),
    ("load_in_4bit=false", "train.method=qlora"),
    ("optim=adamw_torch", "train.optimizer="),
    ("train.learning_rate=1", "train.lr="),
    ("max_stepz=3", "keys have a section"),
])
def test_names_that_are_not_taken_as_is_name_the_key(capsys, override, needle):
    assert needle in _err(capsys, "config", "show", override)


def test_overrides_without_a_yaml_start_from_the_documented_defaults(capsys, captured_train):
    assert cli.main(["config", "show", "train.max_steps=3"]) == 0
    shown = capsys.readouterr().out
    assert cli.main(["train", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert dump_yaml(captured_train["cfg"]) == shown
    assert out.splitlines()[0] == "config: the defaults (shardtune config show) + 1 override: train.max_steps=3"
    d = yaml.safe_load(shown)
    assert d["lora"]["modules_to_save"] == [] and d["train"]["micro_batch_size"] == 4


def test_no_arguments_run_the_quickstart(capsys, captured_train):
    assert cli.main(["train"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"config: {cli.QUICKSTART_LABEL}"
    from importlib.resources import files
    assert captured_train["cfg"] == load_config(str(files("shardtune") / "assets" / "quickstart.yaml"))


def test_final_line_only_on_the_first_rank(capsys, captured_train, monkeypatch):
    assert cli.main(["train"]) == 0
    assert "try: shardtune generate" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("override,needle", [
    ("train.max_steps=-1", ">= 0"), ("train.warmup_steps=-2", ">= 0"), ("train.log_every=0", ">= 1"),
    ("train.eval_every=-1", ">= 0"), ("train.save_every=-5", ">= 0"), ("train.micro_batch_size=0", ">= 1"),
    ("train.grad_accum=0", ">= 1"), ("train.lr=0", "> 0"), ("train.lr=-1e-4", "> 0"), ("lora.rank=0", ">= 1"),
    ("lora.dropout=1.0", "[0, 1)"), ("lora.dropout=-0.1", "[0, 1)"), ("lora.alpha=0", "> 0"),
    ("train.epochs=-1", ">= 0"), ("train.grad_clip=-1", ">= 0"), ("plan.margin=1.5", "[0, 1)"),
])
def test_nonsense_values_are_one_line_errors(capsys, override, needle):
    line = _err(capsys, "config", "show", override)
    assert override.split("=")[0] in line and needle in line, line


def test_argparse_errors_are_one_line(capsys):
    assert "--nproc" in _err(capsys, "train", "--nproc", "two")
    assert "shardtune config keys" in _err(capsys, "config")
