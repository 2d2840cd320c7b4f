"""The `shardtune` command. Parses arguments, calls the library, prints. User errors are one line and exit code 2;
`--debug` shows the traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from shardtune.config import split_config_and_overrides  # noqa: F401  (also used by plan/command.py)
from shardtune.errors import ShardtuneError

# subcommand -> module providing add_arguments(parser) and run(args) -> int
SUBCOMMAND_MODULES = {
    "plan": ("shardtune.plan.command", "predict per-GPU/CPU memory and speed; pick the fastest config that fits"),
    "generate": ("shardtune.export.generate", "generate completions with a trained adapter"),
    "export": ("shardtune.export.merge", "copy the PEFT adapter or merge it into the base model"),
    "evaluate": ("shardtune.eval.evaluate", "measure a trained adapter (text-to-SQL exact and execution accuracy)"),
    "doctor": ("shardtune.doctor", "check the environment and GPUs against a config, before any weight is read"),
    "split": ("shardtune.data.split", "split text-to-SQL records by database into train / held-out files"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="a YAML config (optional) followed by dotted overrides such as lora.rank=32 train.lr=1e-4")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (generate/evaluate pull in torch; `plan` must stay instant)."""
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="shardtune", description="LoRA / QLoRA / full fine-tuning on the GPUs you have.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune (no config: the built-in tiny QLoRA quickstart on CPU)")
    _add_config_args(t)
    t.add_argument("--nproc", type=int, default=1, help="processes per node; >1 starts torchrun itself")
    t.add_argument("--nnodes", type=int, default=1)
    t.add_argument("--node-rank", type=int, default=0)
    t.add_argument("--master-addr", default="127.0.0.1")
    t.add_argument("--master-port", type=int, default=29500)
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    c = sub.add_parser("config", help="show the resolved config or list every key")
    csub = c.add_subparsers(dest="config_command", metavar="show|keys")
    cs = csub.add_parser("show", help="print the resolved config with defaults")
    _add_config_args(cs)
    csub.add_parser("keys", help="every config key with its default and meaning")

    for name, (mod, help_) in SUBCOMMAND_MODULES.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
        if name == chosen:
            importlib.import_module(mod).add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def cmd_train(args) -> int:
    from shardtune.config import load_config
    path, overrides = split_config_and_overrides(args.items)
    if path is None:
        # the embedded default: the bundled quickstart (tiny Llama, toy text-to-SQL, QLoRA on CPU)
        from importlib.resources import files
        path = str(files("shardtune") / "assets" / "quickstart.yaml")
    cfg = load_config(path, overrides)
    under_launcher = "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher:
        from shardtune.parallel.launch import relaunch
        argv = [a for a in args.items] + (["--debug"] if args.debug else [])
        return relaunch(argv, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port)
    from shardtune.train.loop import train
    res = train(cfg)
    if res.eval_losses and len(res.eval_losses) > 1:
        first, last = res.eval_losses[0][1], res.eval_losses[-1][1]
        print(f"eval loss {first:.4f} -> {last:.4f}; try: shardtune generate --adapter {res.output_dir} \"<prompt>\"")
    return 0


def cmd_config(args) -> int:
    from shardtune.config import describe, dump_yaml, load_config
    if args.config_command == "keys":
        for key, default, help_ in describe():
            print(f"{key:32s} {default:20s} {help_}")
        return 0
    if args.config_command == "show":
        path, overrides = split_config_and_overrides(args.items)
        print(dump_yaml(load_config(path, overrides)), end="")
        return 0
    print("usage: shardtune config show [cfg.yaml] [key=value ...] | shardtune config keys", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    from shardtune.quiet import quiet_libraries
    quiet_libraries(debug)
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "train":
            return cmd_train(args)
        if args.command == "config":
            return cmd_config(args)
        return int(importlib.import_module(args._module).run(args) or 0)
    except ShardtuneError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
