"""The `shardtune` command. Parses arguments, calls the library, prints. User errors are one line and exit code 2;
`--debug` shows the traceback.

Options may come anywhere among the positionals (`cfg.yaml --nproc 2 k=v`); other trainers' option spellings
(`--max_steps 10`) get a one-line hint with the shardtune key.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from shardtune.config import split_config_and_overrides  # noqa: F401  (also used by plan/command.py)
from shardtune.errors import ConfigError, ShardtuneError

# subcommand -> module providing add_arguments(parser) and run(args) -> int
SUBCOMMAND_MODULES = {
    "plan": ("shardtune.plan.command", "predict per-GPU/CPU memory and speed; pick the fastest config that fits"),
    "generate": ("shardtune.export.generate", "generate completions with a trained adapter"),
    "export": ("shardtune.export.merge", "copy the PEFT adapter or merge it into the base model"),
    "evaluate": ("shardtune.eval.evaluate", "measure a trained adapter (text-to-SQL exact and execution accuracy)"),
    "doctor": ("shardtune.doctor", "check the environment and GPUs against a config, before any weight is read"),
    "split": ("shardtune.data.split", "split text-to-SQL records by database into train / held-out files"),
}
# commands that run a model on this machine: their CPU thread counts are chosen before torch does any work
COMPUTE_COMMANDS = ("generate", "evaluate", "export")
QUICKSTART_LABEL = "the quickstart (shardtune/assets/quickstart.yaml)"
# set by the process that starts torchrun, so its ranks do not repeat what it already printed
LAUNCHED_ENV = "SHARDTUNE_LAUNCHED"


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing value, a bad int) as one line through the CLI's error path."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="a YAML config (optional) and dotted overrides such as lora.rank=32 train.lr=1e-4; "
                        "no arguments at all: the quickstart")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (generate/evaluate pull in torch; `plan` must stay instant)."""
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    parser = _Parser(prog="shardtune", description="LoRA / QLoRA / full fine-tuning on the GPUs you have.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("train", help="fine-tune (no arguments: the built-in tiny QLoRA quickstart on CPU)")
    _add_config_args(t)
    t.add_argument("--nproc", type=int, default=1, help="processes per node; >1 starts torchrun itself")
    t.add_argument("--nnodes", type=int, default=1)
    t.add_argument("--node-rank", type=int, default=0)
    t.add_argument("--master-addr", default="127.0.0.1")
    t.add_argument("--master-port", type=int, default=29500)
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    c = sub.add_parser("config", help="show the resolved config or list every key")
    csub = c.add_subparsers(dest="config_command", metavar="show|keys", parser_class=_Parser)
    cs = csub.add_parser("show", help="print the resolved config with defaults")
    _add_config_args(cs)
    cs.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    csub.add_parser("keys", help="every config key with its default and meaning")

    for name, (mod, help_) in SUBCOMMAND_MODULES.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
        if name == chosen:
            importlib.import_module(mod).add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def check_unknown_options(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """Stop at an option this command does not have, naming shardtune's spelling when another trainer's is used
    (`--max_steps 10` -> train.max_steps=10)."""
    from shardtune.aliases import hint
    known = list(parser._option_string_actions)
    for i, a in enumerate(args):
        if not a.startswith("--") or a == "--":
            continue
        name, eq, value = a.partition("=")
        if any(k == name or (parser.allow_abbrev and k.startswith(name)) for k in known):
            continue
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
        h = hint(name, value)
        if h is None and name.lstrip("-").replace("-", "_") in {k.rsplit(".", 1)[-1] for k in _config_keys()}:
            h = next(f"{k}={value if value is not None else '<value>'}" for k in _config_keys()
                     if k.rsplit(".", 1)[-1] == name.lstrip("-").replace("-", "_"))
        raise ConfigError(f"unknown option '{name}'" + (f"; shardtune's spelling: {h}" if h else
                                                        f"; see {parser.prog} --help"))


def _config_keys() -> list[str]:
    from shardtune.config import describe
    return [k for k, _, _ in describe()]


def parse(argv: list[str]) -> argparse.Namespace:
    """argv -> Namespace with .command (None: print help). Options may sit anywhere among positionals."""
    parser = build_parser(argv)
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None:  # only options: --help, --debug
        args = parser.parse_args(argv)
        args.command = None
        return args
    head, command, rest = argv[:i], argv[i], argv[i + 1:]
    sub = _subparser(parser, command)
    if sub is None:
        parser.parse_args(argv)  # argparse names the valid commands (as a one-line error)
    config_command = None
    if command == "config":
        if not rest or rest[0] not in ("show", "keys"):
            raise ConfigError("usage: shardtune config show [cfg.yaml] [key=value ...] | shardtune config keys")
        config_command, sub, rest = rest[0], _subparser(sub, rest[0]), rest[1:]
    check_unknown_options(sub, rest)
    args = sub.parse_intermixed_args(rest)
    args.command, args.config_command = command, config_command
    args.debug = "--debug" in head or getattr(args, "debug", False)
    return args


def resolve_train_config(items: list[str], notes: list[str] | None = None):
    """(RunConfig, what it was built from). No arguments: the quickstart; overrides without a YAML start from the
    documented defaults (what `shardtune config show` prints), never from the quickstart."""
    from importlib.resources import files

    from shardtune.config import load_config
    path, overrides = split_config_and_overrides(items)
    if path is None and not overrides:
        return load_config(str(files("shardtune") / "assets" / "quickstart.yaml"), [], notes), QUICKSTART_LABEL
    base = path if path is not None else "the defaults (shardtune config show)"
    label = base + (f" + {len(overrides)} override{'s' * (len(overrides) > 1)}: {' '.join(overrides)}"
                    if overrides else "")
    return load_config(path, overrides, notes), label


def _is_first_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    notes: list[str] = []
    cfg, label = resolve_train_config(args.items, notes)
    under_launcher = "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if _is_first_rank() and LAUNCHED_ENV not in os.environ:
        print(f"config: {label}", flush=True)
        for n in notes:
            print(f"note: {n}", flush=True)
    if args.nproc < 1 or args.nnodes < 1:
        raise ConfigError(f"--nproc {args.nproc} / --nnodes {args.nnodes}: both must be >= 1")
    if (args.nproc > 1 or args.nnodes > 1) and not under_launcher:
        from shardtune.parallel.launch import relaunch
        from shardtune.threads import child_thread_env
        # what the ranks get on top of this environment (this process's own stays as it was)
        extra_env = {**child_thread_env(args.nproc), LAUNCHED_ENV: "1"}
        argv = list(args.items) + (["--debug"] if args.debug else [])
        return relaunch(argv, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                        master_addr=args.master_addr, master_port=args.master_port, extra_env=extra_env)
    from shardtune.train.loop import train  # sets its CPU threads in Trainer.setup (shardtune/threads.py)
    res = train(cfg)
    if _is_first_rank() and res.eval_losses and len(res.eval_losses) > 1:
        first, last = res.eval_losses[0][1], res.eval_losses[-1][1]
        print(f"eval loss {first:.4f} -> {last:.4f}; try: shardtune generate --adapter {res.output_dir} \"<prompt>\"")
    return 0


def cmd_config(args) -> int:
    from shardtune.config import describe, dump_yaml, load_config
    if args.config_command == "keys":
        for key, default, help_ in describe():
            print(f"{key:32s} {default:20s} {help_}")
        return 0
    path, overrides = split_config_and_overrides(args.items)
    notes: list[str] = []
    cfg = load_config(path, overrides, notes)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(dump_yaml(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    from shardtune.quiet import quiet_libraries
    quiet_libraries(debug)
    args = None
    try:
        args = parse(argv)
        if args.command is None:
            build_parser(argv).print_help()
            return 0
        if args.command == "train":
            return cmd_train(args)
        if args.command == "config":
            return cmd_config(args)
        if args.command in COMPUTE_COMMANDS:
            from shardtune.threads import configure_threads
            configure_threads()
        return int(importlib.import_module(args._module).run(args) or 0)
    except ShardtuneError as e:
        if debug:
            raise
        from shardtune.errors import OutOfMemory, RankLost, Stopped
        # most errors are raised by every rank alike: rank 0's line will do; these two are one rank's own
        if os.environ.get("RANK", "0") == "0" or isinstance(e, (RankLost, OutOfMemory)):
            print(str(e) if isinstance(e, Stopped) else f"error: {e}", file=sys.stderr)
        if isinstance(e, RankLost):
            # the process group is broken: tearing it down at exit aborts the process (gloo: "terminate called
            # without an active exception"), so leave without running destructors
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        # a CUDA out-of-memory outside training (evaluate, generate, export merge): one line too (the trainer words
        # its own with the step and checkpoint)
        torch = sys.modules.get("torch")
        if debug or torch is None or not isinstance(e, torch.OutOfMemoryError):
            raise
        from shardtune.errors import OutOfMemory, first_line
        first = first_line(e)
        command = getattr(args, "command", None) or "?"
        print(f"error: out of GPU memory in `shardtune {command}` ({first}); use a smaller batch or a smaller "
              "model, or free the GPU", file=sys.stderr)
        return OutOfMemory.exit_code


if __name__ == "__main__":
    sys.exit(main())
