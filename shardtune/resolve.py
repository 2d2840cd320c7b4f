"""The run decisions that train, plan and doctor must make alike: parallel strategy, compute precision, which model
heads the loss can be fused with, and which loss path and kernels a CUDA run takes.

Each decision has one function here, so the three callers cannot disagree. This module sits below plan/ and
parallel/ (it imports only errors; torch is never imported), so both can use it.
"""

from __future__ import annotations

import importlib.util

from shardtune.errors import ConfigError, EnvironmentProblem

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("bf16", "fp16", "fp32")

# model types whose causal-LM head is a plain projection of the decoder's last hidden state (no softcap, no scale):
# the trainer can fuse it with the loss (train/loss.py), and the planner plans the fused loss for them
FUSABLE_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3", "olmo2", "granite"})


def resolve_strategy(cfg, world_size: int, planning: bool = False) -> str:
    """The engine a run uses. `auto`: DeepSpeed when the user brought a DeepSpeed JSON (that is the engine they
    want), else none on one process and FSDP2 on several. An explicit strategy other than deepspeed next to a
    DeepSpeed JSON is a conflict (the JSON would be ignored). `planning`: the world size is the planned GPUs."""
    p = cfg.parallel
    s = p.strategy
    if p.deepspeed_config and s not in ("auto", "deepspeed"):
        raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config} needs DeepSpeed but parallel.strategy={s}; "
                          "set parallel.strategy=deepspeed (or auto), or drop parallel.deepspeed_config")
    if s == "auto":
        if p.deepspeed_config:
            return "deepspeed"
        return "none" if world_size == 1 else "fsdp"
    if s == "none" and world_size > 1:
        what = f"the plan is for {world_size} GPUs" if planning else f"{world_size} processes were launched"
        raise ConfigError(f"parallel.strategy=none but {what}; use parallel.strategy=ddp, fsdp or deepspeed"
                          + (" (or plan for 1 GPU)" if planning else ""))
    if s not in STRATEGIES:
        raise ConfigError(f"parallel.strategy={s!r}; allowed: auto | {' | '.join(STRATEGIES)}")
    return s


def resolve_precision(want: str, on_gpu: bool, gpu_bf16: bool = True, gpu_name: str = "this GPU") -> str:
    """The compute dtype's name: auto = bf16 on GPUs that have it, fp16 on older GPUs (V100, T4; with loss
    scaling), fp32 on CPU. Half precision on CPU, or bf16 on a GPU without it, is an error naming the fix."""
    if want not in ("auto",) + PRECISIONS:
        raise ConfigError(f"train.precision={want!r}; allowed: auto | bf16 | fp16 | fp32")
    if not on_gpu:
        if want in ("bf16", "fp16"):
            # CPU autocast in half precision is slow and lossy for training; be explicit rather than surprising.
            raise EnvironmentProblem(f"train.precision={want} on CPU is not supported; use train.precision=fp32 "
                                     "(or auto) on CPU")
        return "fp32"
    if want == "auto":
        return "bf16" if gpu_bf16 else "fp16"
    if want == "bf16" and not gpu_bf16:
        raise EnvironmentProblem(f"train.precision=bf16 but {gpu_name} has no bfloat16; use train.precision=fp16 "
                                 "(shardtune applies loss scaling)")
    return want


def precision_refusal(want: str, **where) -> tuple[str, str] | None:
    """(what, fix) when resolve_precision refuses `want` on `where` (its keyword arguments), else None: for doctor,
    which reports the trainer's rule as a check instead of raising."""
    try:
        resolve_precision(want, **where)
    except (ConfigError, EnvironmentProblem) as e:
        what, _, fix = str(e).partition("; ")
        return what, fix
    return None


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_kernels(mode: str, liger_available: bool) -> str:
    """train.kernels on a CUDA run: auto = Liger's fused RMSNorm/RoPE/SwiGLU when liger-kernel is available."""
    if mode in ("none", "liger"):
        return mode
    return "liger" if liger_available else "none"


def resolve_loss_path(fused_loss: bool, model_type: str | None, liger_available: bool) -> str:
    """The loss a CUDA run computes: `none` (full logits) when train.fused_loss is off or the head is not a plain
    projection, else the fused loss under every engine: Liger's fused linear cross-entropy when liger-kernel is
    available, else shardtune's chunked loss. `model_type=None` (unknown) is assumed fusable."""
    if not fused_loss or (model_type is not None and model_type not in FUSABLE_HEAD_TYPES):
        return "none"
    return "liger" if liger_available else "chunked"


# ------------------------------------------------------------------------------------------------ DeepSpeed JSON

# (where in a DeepSpeed JSON, the shardtune key it decides); precision and offloads are read separately
DS_JSON_KEYS = (("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
                ("gradient_accumulation_steps", "train.grad_accum"),
                ("gradient_clipping", "train.grad_clip"),
                ("zero_optimization.stage", "parallel.zero_stage"),
                ("optimizer.params.lr", "train.lr"),
                ("optimizer.params.weight_decay", "train.weight_decay"))


def config_value(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def explicitly_set(cfg, key: str) -> bool:
    """Whether the user set `key` (YAML or override). load_config records that; a config built in code has no record,
    so there a value other than the default counts as set."""
    keys = getattr(cfg, "explicit_keys", None)
    if keys is not None:
        return key in keys
    from shardtune.config import RunConfig
    return config_value(cfg, key) != config_value(RunConfig(), key)


def _json_at(ds: dict, path: str):
    node = ds
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _usable(key: str, value):
    """`value` as the type of shardtune's `key`, or None when it is not one (left for build_ds_config to report)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key in ("train.micro_batch_size", "train.grad_accum"):
        return int(value) if float(value).is_integer() and value >= 1 else None
    if key == "parallel.zero_stage":
        return int(value) if value in (0, 1, 2, 3) else None
    return float(value)


def deepspeed_json_values(ds: dict) -> dict:
    """The shardtune keys a DeepSpeed JSON gives explicit values for ("auto" and absent give none)."""
    out = {}
    for path, key in DS_JSON_KEYS:
        v = _usable(key, _json_at(ds, path))
        if v is not None:
            out[key] = v
    for sec in ("offload_optimizer", "offload_param"):
        dev = _json_at(ds, f"zero_optimization.{sec}.device")
        if isinstance(dev, str) and dev.strip().lower() != "auto":
            out[f"parallel.{sec}"] = dev.strip().lower() not in ("none", "")
    for name in ("bf16", "fp16"):
        if _json_at(ds, f"{name}.enabled") is True:
            out["train.precision"] = name
    return out


def read_deepspeed_json(path: str) -> dict:
    from shardtune.jsonfile import read_json_object
    return read_json_object(path, f"parallel.deepspeed_config '{path}'", "fix the file or drop the setting",
                            ConfigError, missing="pass the path of a DeepSpeed JSON file")


def deepspeed_json_adoptions(cfg, ds: dict) -> dict:
    """The JSON's explicit values for shardtune keys the user did not set: those the run adopts. A key set on both
    sides keeps the user's value (a difference is then a conflict, reported by build_ds_config)."""
    return {k: v for k, v in deepspeed_json_values(ds).items() if not explicitly_set(cfg, k)}


def with_deepspeed_json(cfg):
    """`cfg` with a DeepSpeed JSON's explicit values adopted for the keys the user did not set (a copy; `cfg` itself
    when there is no JSON). Train and plan both run this, so they see the same micro batch, stage and offloads."""
    if not cfg.parallel.deepspeed_config:
        return cfg
    import copy
    new = copy.deepcopy(cfg)
    for key, value in deepspeed_json_adoptions(cfg, read_deepspeed_json(cfg.parallel.deepspeed_config)).items():
        section, name = key.split(".")
        setattr(getattr(new, section), name, value)
    return new
