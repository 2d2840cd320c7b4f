"""The typed run configuration: one tree of dataclasses, loaded from YAML plus `section.key=value` overrides.

Each field carries its help text next to it. Validation errors name the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from shardtune.errors import ConfigError

BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:toy-sql"


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f(BUILTIN_MODEL, "local HF model directory, hub id, a .gguf file (dequantized once to a cached HF directory; pip install 'shardtune[gguf]'), or builtin:tiny-llama (ships with the package, nothing downloaded)")
    gguf_file: Optional[str] = _f(None, "name of a .gguf file inside the name_or_path directory (same as name_or_path=DIR/NAME.gguf)")
    trust_remote_code: bool = _f(False, "allow model code shipped with the checkpoint (needed by some architectures)")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | eager | flash_attention_2")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit)")
    random_init: bool = _f(False, "ignore any weights: random N(0, 0.02) weights from config.json alone (benchmarks, dry runs of shapes whose checkpoint you do not have)")


@dataclass
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type for method=qlora")
    double_quant: bool = _f(True, "quantize the 4-bit absmax constants again (saves ~0.4 bit/param)")


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: Union[str, list[str]] = _f("all-linear", "'all-linear' or a list of module names (q_proj, v_proj, ...)")
    modules_to_save: list[str] = _f([], "extra modules trained in full and saved with the adapter (e.g. lm_head)")


@dataclass
class DataConfig:
    path: str = _f(BUILTIN_DATA, "JSON / JSONL / CSV / Parquet file, or builtin:toy-sql (bundled)")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "text2sql"] = _f(
        "auto", "record format; auto detects it from the first record's keys")
    chat_template: str = _f("auto", "auto (tokenizer's own, else the built-in 'chatml') | chatml | llama3 | alpaca | plain")
    max_seq_len: int = _f(512, "samples are truncated to this many tokens")
    packing: bool = _f(False, "concatenate short samples into rows of max_seq_len (attention kept within each sample)")
    train_on_prompt: bool = _f(False, "compute loss on prompt tokens too (default: response tokens only)")
    val_path: Optional[str] = _f(None, "separate validation file; if unset, val_fraction of the data is held out")
    val_fraction: float = _f(0.1, "fraction of the data held out for eval loss when val_path is unset (0 disables)")
    on_bad_line: Literal["error", "skip"] = _f("error", "malformed record: stop with file:line (error), or report and skip it")
    max_samples: Optional[int] = _f(None, "use only the first N records (quick experiments)")


@dataclass
class TrainConfig:
    method: Literal["lora", "qlora", "int8", "full"] = _f("qlora", "lora (bf16 base), qlora (4-bit base), int8 (LLM.int8 base + LoRA), full")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "compute dtype; auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = CUDA when present")
    micro_batch_size: int = _f(4, "samples per forward pass per rank")
    grad_accum: int = _f(1, "micro batches accumulated per optimizer step")
    max_steps: int = _f(60, "optimizer steps (takes precedence over epochs when > 0)")
    epochs: float = _f(1.0, "passes over the data when max_steps <= 0")
    lr: float = _f(2e-4, "peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = _f("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = _f(5, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _f("adamw", "torch AdamW, or bitsandbytes 8-bit / paged AdamW (CUDA only)")
    fused_loss: bool = _f(True, "score only labelled positions, vocab projection + loss chunked/fused (no full fp32 logits)")
    kernels: Literal["auto", "liger", "none"] = _f("auto", "fused RMSNorm/RoPE/SwiGLU kernels: auto = Liger when CUDA and installed")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (saves memory, costs ~1/3 more compute)")
    checkpoint_layers: Optional[int] = _f(None, "with gradient_checkpointing: how many decoder layers recompute, "
                                                "evenly spread (unset: all); fewer is faster and keeps more memory")
    checkpoint_policy: Literal["layer", "selective"] = _f("layer", "with gradient_checkpointing: what a recomputed "
                                                           "layer keeps: layer (its input only) | selective (also its "
                                                           "matmul and attention outputs; recomputes norms, activations, "
                                                           "RoPE, dropout, dequantization, LoRA's B matmul); not under "
                                                           "DeepSpeed ZeRO-3")
    fused_lora: bool = _f(False, "LoRA's dropout regenerated in backward instead of stored: same math, ~30% less "
                                 "activation memory, ~8% slower without checkpointing (docs/benchmarks.md); plan.mode=auto "
                                 "turns it on when that lets a faster setup fit. peft's forward under ZeRO-3, DoRA")
    offload_activations: bool = _f(False, "move saved activations to pinned CPU memory during forward and back "
                                          "for backward, on a side stream (CUDA only)")
    offload_layers: Optional[int] = _f(None, "with offload_activations: offload only this many decoder layers, the "
                                             "first ones that do not recompute (unset: the whole forward); fewer "
                                             "keeps the copies hidden behind compute")
    compile: bool = _f(False, "torch.compile each decoder layer (CUDA only; first steps compile)")
    seed: int = _f(42, "seed for init, data order and dropout")
    log_every: int = _f(5, "log loss / lr / grad norm / tokens/s every N steps")
    eval_every: int = _f(20, "eval loss every N steps (0 disables)")
    save_every: int = _f(0, "save a checkpoint every N steps (0: only at the end)")
    resume: bool = _f(False, "resume from the latest checkpoint in output.dir")
    max_bad_steps: int = _f(3, "stop after this many consecutive steps with a non-finite loss or gradient norm "
                               "(each one is skipped: no update); fp16 loss-scale skips do not count")


@dataclass
class ParallelConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = _f("auto", "auto = none on 1 process, fsdp on several")
    zero_stage: Literal[2, 3] = _f(3, "deepspeed ZeRO stage; for fsdp, 2 = keep params gathered after forward")
    offload_optimizer: bool = _f(False, "keep optimizer states (and the step) on the CPU")
    offload_param: bool = _f(False, "keep sharded parameters on the CPU between uses")
    fsdp_layers_per_unit: int = _f(0, "fsdp: decoder layers gathered together as one FSDP unit; more = fewer "
                                      "gathers, hooks and rank syncs per step, more gathered memory (0 = auto: 2 "
                                      "when two layers gather to <= 512 MiB, as 4-bit layers of 8B-13B models do)")
    deepspeed_config: Optional[str] = _f(None, "a DeepSpeed JSON to use as-is; 'auto' values are filled from this config")
    balance_tolerance: float = _f(0.15, "stop if any rank's parameter bytes differ from the mean by more than this")
    zero3_leaf_layers: bool = _f(False, "deepspeed ZeRO-3: gather each decoder layer's parameters at once (one hook "
                                        "per layer) instead of per submodule; needs gradient checkpointing; one "
                                        "H200 rank: 2.65x the per-module path, 0.73x FSDP2")
    zero3_load: Literal["gpu", "cpu"] = _f("gpu", "deepspeed ZeRO-3 loading: gpu = each rank loads the whole 4-bit "
                                                  "model on its GPU, then DeepSpeed partitions it; cpu = each rank "
                                                  "loads it into CPU RAM and it is partitioned onto the GPUs one "
                                                  "parameter at a time (the GPU never holds the whole model; needs "
                                                  "the whole model in CPU RAM per rank; not yet measured on a GPU)")


@dataclass
class PlanConfig:
    mode: Literal["manual", "auto"] = _f("manual", "auto: let the planner choose method, strategy, checkpointing and micro batch")
    gpus: Optional[str] = _f(None, "hardware to plan for, e.g. 8xV100-32GB, 2xRTX4090, 1x24GB (default: detected)")
    global_batch_size: Optional[int] = _f(None, "target samples per optimizer step for auto (default: micro_batch * accum * ranks)")
    margin: float = _f(0.1, "keep this fraction of each GPU's memory free")


@dataclass
class OutputConfig:
    dir: str = _f("runs/quickstart", "where metrics, checkpoints and the adapter go")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        ["tensorboard"], "where metrics go besides metrics.jsonl (always written): tensorboard, wandb, mlflow "
                         "(pip install 'shardtune[wandb]' / '[mlflow]'; offline unless configured), or none")
    plot: bool = _f(True, "write loss.png at the end")
    overwrite: bool = _f(False, "start over in an output.dir that already holds a run: its adapter, checkpoints, "
                               "metrics and plots are deleted first (default: such a dir is refused unless "
                               "train.resume=true)")

    @property
    def tensorboard(self) -> bool:
        return "tensorboard" in self.report_to


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else _resolve(cls, f)):
            keys += _all_keys(_resolve(cls, f), prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _resolve(cls, f):
    return typing.get_type_hints(cls)[f.name]


def _suggest(key: str, candidates: list[str]) -> str:
    from shardtune.aliases import hint
    tail = key.rsplit(".", 1)[-1]
    known = hint(tail)
    if known:  # another trainer's name for a shardtune key: say the shardtune spelling
        return f"; shardtune's spelling: {known}"
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not near:  # compare the last component too: 'lora.rnak' vs 'lora.rank'
        by_tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
        near = [by_tail[t] for t in difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)]
    return f" (did you mean '{near[0]}')" if near else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return "a list of " + _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Convert `value` to type `tp` or raise ConfigError naming key, value and what is allowed."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: invalid value {value!r}; allowed: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls, data: dict, prefix: str, known: list[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = prefix + str(k)
            raise ConfigError(f"unknown key '{full}'{_suggest(full, known)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, prefix + f.name + ".", known)
        else:
            kwargs[f.name] = _coerce(prefix + f.name, data[f.name], tp)
    return cls(**kwargs)


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """Command-line items `[cfg.yaml] [key=value ...]`: the first item without '=' is the config file."""
    path, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise ConfigError(f"unexpected argument '{it}'; overrides are key=value (e.g. train.lr=1e-4)")
    return path, overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. lora.rank=32)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def _set(data: dict, keys: list[str], value: Any, what: str) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: '{k}' is not a section")
    node[keys[-1]] = value


def _translate_alias(key: str, value: Any, what: str, notes: list[str] | None) -> tuple[list[str], Any]:
    """A section-less key from another trainer (learning_rate, report_to, lora_r...) -> (shardtune key path, value);
    a name shardtune does not take as is stops with the shardtune spelling."""
    from shardtune.aliases import hint, translate
    found = translate(key, value)
    if found is None:
        h = hint(key, value)
        raise ConfigError(f"unknown key '{key}' in {what}" + (f"; shardtune's spelling: {h}" if h else
                                                             "; keys have a section, e.g. train.lr "
                                                             "(list them: shardtune config keys)"))
    target, new_value = found
    if notes is not None:
        notes.append(f"{key}={value} read as {target}={new_value}" + ("" if what.startswith("override") else
                                                                       f" (in {what})"))
    return target.split("."), new_value


def _move_top_level_aliases(data: dict, where: str, notes: list[str] | None) -> dict:
    sections = {f.name for f in dataclasses.fields(RunConfig)} | {"method"}
    for key in [k for k in data if k not in sections]:
        keys, value = _translate_alias(str(key), data.pop(key), where, notes)
        _set(data, keys, value, where)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                notes: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or none: all defaults), apply dotted overrides, validate. Other trainers' names for the
    same settings (learning_rate, report_to, lora_r, ...) are accepted; each use is described in `notes`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{path}' is a directory; pass a YAML file (see examples/quickstart.yaml)")
        if not p.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a YAML file (see examples/quickstart.yaml)")
        try:
            text = p.read_text()
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML"
                              ) from None
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read ({e.strerror}); check its permissions") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"config file '{path}{where}' is not valid YAML ({getattr(e, 'problem', e)})") from None
        if data is None:  # likely the wrong file: running on all defaults instead would hide that
            raise ConfigError(f"config file '{path}' is empty; add settings (see examples/quickstart.yaml) or leave "
                              "the file out to use the defaults")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (model:, train:, ...)")
        data = _move_top_level_aliases(data, str(path), notes)
    data = _normalise_shorthands(data)
    for ov in overrides:
        keys, value = parse_override(ov)
        if len(keys) == 1 and keys[0] not in ("method", "plan"):
            keys, value = _translate_alias(keys[0], value, f"override '{ov}'", notes)
        _set(data, keys, value, f"override '{ov}'")
        data = _normalise_shorthands(data)
    cfg = _build(RunConfig, data, "", _all_keys(RunConfig))
    # the keys the user set (YAML or overrides): a DeepSpeed JSON's values may fill the others (parallel/dsconfig.py)
    cfg.explicit_keys = frozenset(_dotted_keys(data))
    validate(cfg)
    return cfg


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in data.items():
        out += _dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _normalise_shorthands(data: dict) -> dict:
    # `plan: auto` is the documented shorthand for `plan: {mode: auto}`; `method:` at the top for train.method.
    if isinstance(data.get("plan"), str):
        data["plan"] = {"mode": data["plan"]}
    if "method" in data and not isinstance(data["method"], dict):
        data.setdefault("train", {})
        if isinstance(data["train"], dict):
            data["train"]["method"] = data.pop("method")
    # `lora.r` is peft's name for the rank; accept it as an alias.
    if isinstance(data.get("lora"), dict) and "r" in data["lora"]:
        data["lora"]["rank"] = data["lora"].pop("r")
    out = data.get("output")
    if isinstance(out, dict):
        rt = out.get("report_to")
        if isinstance(rt, str):  # HF Trainer's spellings: "none", "all", "wandb", "tensorboard,wandb"
            rt = rt.strip("[]").split(",")
        if isinstance(rt, list):
            rt = [str(x).strip() for x in rt if str(x).strip().lower() not in ("none", "")]
            out["report_to"] = ["tensorboard", "wandb", "mlflow"] if rt == ["all"] else rt
        if "tensorboard" in out:  # the earlier boolean switch, still accepted: adds or removes tensorboard
            on = _coerce("output.tensorboard", out.pop("tensorboard"), bool)
            rest = [x for x in out.get("report_to", ["tensorboard"]) if x != "tensorboard"]
            out["report_to"] = (["tensorboard"] if on else []) + rest
    return data


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that single-field types cannot express."""
    t, lora, d = cfg.train, cfg.lora, cfg.data
    for key, v in (("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                   ("train.log_every", t.log_every), ("train.max_bad_steps", t.max_bad_steps),
                   ("lora.rank", lora.rank), ("data.max_seq_len", d.max_seq_len),
                   ("data.max_samples", d.max_samples if d.max_samples is not None else 1)):
        if v < 1:
            raise ConfigError(f"{key}: invalid value {v}; must be >= 1")
    for key, v, meaning in (("train.max_steps", t.max_steps, " (0: train.epochs decides)"),
                            ("train.epochs", t.epochs, ""), ("train.warmup_steps", t.warmup_steps, ""),
                            ("train.eval_every", t.eval_every, " (0 disables)"),
                            ("train.save_every", t.save_every, " (0: only at the end)"),
                            ("train.weight_decay", t.weight_decay, ""), ("train.grad_clip", t.grad_clip, " (0 disables)"),
                            ("train.checkpoint_layers", t.checkpoint_layers or 0, " (unset: all layers)"),
                            ("train.offload_layers", t.offload_layers or 0, " (unset: the whole forward)")):
        if v < 0:
            raise ConfigError(f"{key}: invalid value {v}; must be >= 0{meaning}")
    for key, v in (("train.lr", t.lr), ("lora.alpha", lora.alpha),
                   ("parallel.balance_tolerance", cfg.parallel.balance_tolerance)):
        if v <= 0:
            raise ConfigError(f"{key}: invalid value {v}; must be > 0")
    if not 0 <= cfg.plan.margin < 1:
        raise ConfigError(f"plan.margin: invalid value {cfg.plan.margin}; must be in [0, 1)")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: invalid value {d.val_fraction}; must be in [0, 1)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.dropout: invalid value {lora.dropout}; must be in [0, 1)")
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError("train.max_steps and train.epochs are both 0; set one of them (e.g. train.max_steps=60)")
    if cfg.parallel.fsdp_layers_per_unit < 0:
        raise ConfigError(f"parallel.fsdp_layers_per_unit: invalid value {cfg.parallel.fsdp_layers_per_unit}; "
                          "must be 0 (auto) or >= 1")
    if (t.gradient_checkpointing and t.checkpoint_policy == "selective" and cfg.parallel.strategy == "deepspeed"
            and cfg.parallel.zero_stage == 3):
        raise ConfigError("train.checkpoint_policy=selective is not supported under DeepSpeed ZeRO-3 (untested with "
                          "its per-module gathers); use train.checkpoint_policy=layer or parallel.strategy=fsdp")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        lora.target_modules = [m.strip() for m in lora.target_modules.split(",") if m.strip()]


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `shardtune config keys` and the docs."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(getattr(inst, f.name)), f.metadata.get("help", "")))
    return rows


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
