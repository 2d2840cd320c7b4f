"""`shardtune plan`: predict per-GPU and CPU memory and speed of a config, or pick the fastest that fits (--auto).

    shardtune plan cfg.yaml [key=value ...]
    shardtune plan --model DIR_OR_NAME --gpus 8xV100-32GB [--nodes 2] [--method qlora --strategy fsdp
                   --zero-stage 3 --micro-batch 2 --seq 2048 --grad-ckpt on|off --offload-optimizer --offload-param
                   --auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

STRATEGY_ALIASES = {"zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3), "fsdp2": ("fsdp", 3)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="a YAML config (optional) followed by dotted overrides such as lora.rank=32")
    p.add_argument("--model", help="model directory, config.json/YAML file, .gguf file, or catalogue name "
                                    "(e.g. llama-3-8b)")
    p.add_argument("--gpus", help="GPUs per node: 8xV100-32GB, 2xRTX4090, 1x24GB, 4xH200@24GB (default: detected)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (each with --gpus)")
    p.add_argument("--cpu-ram", help="CPU RAM per node, e.g. 512GB (default: detected for this machine's GPUs; "
                   "offload plans of named GPUs need it)")
    p.add_argument("--method", choices=["full", "lora", "qlora", "int8"])
    p.add_argument("--strategy", choices=["none", "ddp", "fsdp", "deepspeed", "zero2", "zero3"])
    p.add_argument("--zero-stage", type=int, choices=[2, 3])
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step for --auto")
    p.add_argument("--seq", type=int, help="sequence length (data.max_seq_len)")
    p.add_argument("--grad-ckpt", choices=["on", "off"])
    p.add_argument("--offload-optimizer", action="store_true", default=None)
    p.add_argument("--offload-param", action="store_true", default=None)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--kernels", choices=["auto", "liger", "none"],
                   help="Liger kernels on the GPUs (auto: assumed for --gpus, checked for detected GPUs)")
    p.add_argument("--margin", type=float, help="fraction of GPU memory kept free (plan.margin)")
    p.add_argument("--stack", choices=["shardtune", "hf"], default="shardtune",
                   help="what runs the training: shardtune, or the HF Trainer + peft + bitsandbytes stack (full "
                        "logits, no Liger, prepare_model_for_kbit_training's fp32 upcast)")
    p.add_argument("--lora-dtype", choices=["fp32", "bf16"],
                   help="--stack hf: LoRA weights in fp32 (peft's default) or bf16 (the QLoRA paper's script)")
    p.add_argument("--optim", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"],
                   help="--stack hf: the Trainer's optimizer (paged ones page their states to CPU under pressure)")
    p.add_argument("--auto", action="store_true", help="search strategy/offload/checkpointing/micro batch")
    p.add_argument("--search-method", action="store_true", help="with --auto, also try lora/qlora/int8/full")
    p.add_argument("--constants", help="JSON file of planner constants (e.g. fitted by shardtune.plan.calibrate)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def overrides_from_flags(args) -> list[str]:
    ov = []

    def put(key, val):
        if val is not None:
            ov.append(f"{key}={val}")
    put("model.name_or_path", args.model)
    put("plan.gpus", args.gpus)
    put("train.method", args.method)
    if args.strategy:
        strategy, stage = STRATEGY_ALIASES.get(args.strategy, (args.strategy, None))
        put("parallel.strategy", strategy)
        put("parallel.zero_stage", stage)
    put("parallel.zero_stage", args.zero_stage)
    put("train.micro_batch_size", args.micro_batch)
    put("train.grad_accum", args.grad_accum)
    put("plan.global_batch_size", args.global_batch)
    put("data.max_seq_len", args.seq)
    if args.grad_ckpt:
        put("train.gradient_checkpointing", "true" if args.grad_ckpt == "on" else "false")
    if args.offload_optimizer:
        put("parallel.offload_optimizer", "true")
    if args.offload_param:
        put("parallel.offload_param", "true")
    put("train.precision", args.precision)
    put("lora.rank", args.lora_rank)
    put("train.kernels", args.kernels)
    put("plan.margin", args.margin)
    if args.auto:
        put("plan.mode", "auto")
    return ov


def run(args) -> int:
    """Exit code: 0 fits (tight included), 1 does not fit (manual, --auto, text or --json alike); bad input raises
    a ShardtuneError (the CLI prints it in one line, exit 2)."""
    from shardtune.config import load_config, split_config_and_overrides
    from shardtune.errors import ConfigError
    from shardtune.hardware import hardware_for, parse_memory
    from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
    from shardtune.plan.estimate import estimate
    from shardtune.plan.report import plan_dict, render_estimate
    from shardtune.plan.search import smallest_change

    path, overrides = split_config_and_overrides(list(args.items))
    cfg = load_config(path, overrides + overrides_from_flags(args))
    constants = PlanConstants.load(args.constants) if args.constants else DEFAULT_CONSTANTS
    cpu_ram = parse_memory(args.cpu_ram) if args.cpu_ram else None
    hw = hardware_for(cfg.plan.gpus, nodes=args.nodes, cpu_ram=cpu_ram)
    color = sys.stdout.isatty() and not args.json
    stack = stack_profile(args)
    if cfg.plan.mode == "auto":
        return _run_auto(cfg, hw, args, constants, color, stack)
    est = estimate(cfg, hw, constants=constants, stack=stack)
    if est.memory.offload and est.memory.cpu_budget is None:
        raise ConfigError(f"{est.setup.label} offloads to CPU memory ({est.memory.cpu_total / 2 ** 30:.0f} GiB per "
                          "node predicted) and the node's CPU RAM is unknown: give --cpu-ram (e.g. --cpu-ram 512GB)")
    ways = smallest_change(est.shape, est.setup, hw, est.margin, constants) if not est.fits and not est.invalid else []
    if args.json:
        print(json.dumps(plan_dict(est, ways), indent=1))
    else:
        print(render_estimate(est, color), end="")
        if not est.fits and not est.invalid:
            print("try: shardtune plan ... --auto (searches strategy, offload, checkpointing, micro batch)")
            for w in ways:
                print(f"or:  {w}")
    return 0 if est.fits else 1


def stack_profile(args) -> dict | None:
    """TrainSetup fields of --stack (None: shardtune's own)."""
    from shardtune.errors import ConfigError
    if args.stack != "hf":
        if args.lora_dtype or args.optim:
            raise ConfigError("--lora-dtype and --optim describe the HF stack; add --stack hf (shardtune trains "
                              "LoRA in fp32; its optimizer is train.optimizer)")
        return None
    return {"stack": "hf", "lora_dtype": args.lora_dtype or "fp32", "optimizer": args.optim}


def _run_auto(cfg, hw, args, constants, color: bool, stack: dict | None) -> int:
    """--auto: exit 0 with the fastest setup that fits with the margin, else 1 (text or JSON alike)."""
    from shardtune.errors import DoesNotFit
    from shardtune.plan.report import auto_failed_section, auto_section, plan_dict, render_search
    from shardtune.plan.search import auto_plan
    try:
        res = auto_plan(cfg, hw, search_method=args.search_method, constants=constants, stack=stack)
    except DoesNotFit as e:
        ways = getattr(e, "suggestions", [])
        if args.json:
            print(json.dumps(plan_dict(getattr(e, "leanest", None), ways, auto_failed_section(e)), indent=1))
        else:
            print(f"DOES NOT FIT: {e}")
        return 1
    if args.json:
        print(json.dumps(plan_dict(res.best, [], auto_section(res)), indent=1))
    else:
        print(render_search(res, color), end="")
    return 0
