"""The DeepSpeed config: built from shardtune's config, or taken from a user's JSON (parallel.deepspeed_config) with its
Hugging Face-style "auto" values filled from shardtune's config.

Rules for a user JSON (documented in docs/distributed.md):
- "auto" is replaced by shardtune's value; `build_ds_config` returns the list of what it filled (the engine prints it
  in one line).
- The JSON's explicit values are adopted for the shardtune keys the user did not set (micro batch, accumulation,
  clipping, ZeRO stage, offloads, lr, weight decay, precision: shardtune.resolve.with_deepspeed_json, which train and
  plan also run). Only a value the user set explicitly on both sides and that differs is a ConfigError naming both.
- train_batch_size is derived (micro x accumulation x ranks): a different number is a ConfigError.
- An "optimizer" section makes DeepSpeed build the optimizer (DeepSpeedCPUAdam when offloading, a compiled op);
  without one shardtune passes torch AdamW. A "scheduler" section makes DeepSpeed schedule the LR; without one,
  shardtune's warmup + train.schedule runs on DeepSpeed's optimizer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from shardtune.errors import ConfigError
from shardtune.resolve import (DS_JSON_KEYS, deepspeed_json_adoptions, explicitly_set, read_deepspeed_json,
                               with_deepspeed_json)

AUTO = "auto"
QUIET_STEPS = 10**9  # DeepSpeed prints progress every steps_per_print; shardtune logs itself


def _is_auto(v) -> bool:
    return isinstance(v, str) and v.strip().lower() == AUTO


class _Filler:
    """Fills "auto" values of one JSON dict, checks the values shardtune also decides, and records what it did."""

    def __init__(self, src: str, cfg):
        self.src = src
        self.cfg = cfg
        self.filled: list[str] = []

    def fill(self, d: dict, key: str, value, path: str) -> None:
        if key in d and _is_auto(d[key]):
            d[key] = value
            self.filled.append(f"{path}={value}")

    def agree(self, d: dict, key: str, ours, path: str, our_key: str, add: bool) -> None:
        """A value both sides decide. "auto" takes ours (absent too when `add`: the loop depends on it). The run
        already adopted the JSON's values for keys the user did not set (shardtune.resolve.with_deepspeed_json), so
        a remaining difference means the user set both: a conflict naming both."""
        if key not in d or _is_auto(d[key]):
            if key in d:
                self.filled.append(f"{path}={ours}")
            if key in d or add:
                d[key] = ours
            return
        if d[key] != ours:
            set_by_user = our_key in DECIDED_BY_JSON and explicitly_set(self.cfg, our_key)
            how = "set in your config" if set_by_user else "shardtune's value"
            raise ConfigError(f"{path}={d[key]!r} in {self.src} conflicts with {our_key}={ours!r} ({how}); make "
                              f"them equal, drop one of them, or set {path} to \"auto\"")


DECIDED_BY_JSON = {key for _, key in DS_JSON_KEYS}


def _precision_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    return dtype == torch.bfloat16, dtype == torch.float16


def _persistence_threshold(hidden_size: int | None, min_quant_numel: int | None) -> int:
    """Parameters smaller than this stay replicated under ZeRO-3 (saves gathers of norms and biases). HF's 10 x hidden
    would also keep small packed 4-bit weights whole on every rank, so it is capped below the smallest of those."""
    t = 10 * hidden_size if hidden_size else 100_000
    if min_quant_numel:
        t = min(t, max(min_quant_numel - 1, 0))
    return t


def _check_stage(stage, src: str) -> None:
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"zero_optimization.stage={stage!r} in {src}; use 2 or 3")


def zero_stage(cfg) -> int:
    """The ZeRO stage the built config will have: the JSON's number, else parallel.zero_stage. The engine needs it
    before building (stage 3 first makes the 4-bit layers shardable, which sets the persistence threshold)."""
    cfg = with_deepspeed_json(cfg)
    if cfg.parallel.deepspeed_config:
        src = cfg.parallel.deepspeed_config
        z = read_deepspeed_json(src).get("zero_optimization") or {}
        if not isinstance(z, dict):
            raise ConfigError(f"zero_optimization in {src} must be an object, e.g. {{\"stage\": 3}}")
        stage = z.get("stage")
        if isinstance(stage, int) and not isinstance(stage, bool):
            _check_stage(stage, src)
            return stage
    return int(cfg.parallel.zero_stage)


def build_ds_config(cfg, world_size: int, *, compute_dtype: torch.dtype | None = None, hidden_size: int | None = None,
                    total_steps: int | None = None, min_quant_numel: int | None = None) -> tuple[dict, list[str]]:
    """(DeepSpeed config dict, list of 'key=value' filled from shardtune's config). The JSON's values the run adopts
    instead are `adopted_from_json(cfg)`.

    compute_dtype: the run's dtype (default: from train.precision, fp32 for 'auto'); hidden_size: the model's, for the
    bucket sizes; total_steps: for a JSON scheduler's "auto" step counts; min_quant_numel: elements of the smallest
    packed 4-bit weight (keeps ZeRO-3 from replicating it)."""
    user_cfg, cfg = cfg, with_deepspeed_json(cfg)
    if compute_dtype is None:
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    if cfg.parallel.deepspeed_config:
        src = cfg.parallel.deepspeed_config
        ds = copy.deepcopy(read_deepspeed_json(src))
    else:
        src, ds = "the generated DeepSpeed config", {"zero_optimization": {"stage": cfg.parallel.zero_stage}}
    f = _Filler(src, user_cfg)
    _batch_shape(ds, f, cfg.train, world_size)
    _precision(ds, f, compute_dtype)
    f.agree(ds, "gradient_clipping", cfg.train.grad_clip, "gradient_clipping", "train.grad_clip", add=True)
    z = _zero(ds, f, cfg.parallel, hidden_size, min_quant_numel)
    opt = _optimizer(ds, f, cfg.train, z)
    _scheduler(ds, f, cfg.train, opt, total_steps)
    ds.setdefault("steps_per_print", QUIET_STEPS)
    ds.setdefault("wall_clock_breakdown", False)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"{left}=\"auto\" in {src}: shardtune has no value to fill it with; give a number")
    return ds, f.filled


def _batch_shape(ds: dict, f: _Filler, t, world_size: int) -> None:
    """What the loop feeds: micro batch, accumulation and their product over the ranks must all agree."""
    micro, accum = t.micro_batch_size, t.grad_accum
    f.agree(ds, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu", "train.micro_batch_size",
            add=True)
    f.agree(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps", "train.grad_accum", add=True)
    f.agree(ds, "train_batch_size", micro * accum * world_size, "train_batch_size",
            f"train.micro_batch_size x train.grad_accum x {world_size} ranks", add=True)


def _precision(ds: dict, f: _Filler, compute_dtype: torch.dtype) -> None:
    """The loop's autocast dtype decides bf16/fp16.enabled; fp16 gets DeepSpeed's dynamic loss scaling defaults."""
    for name, on in zip(("bf16", "fp16"), _precision_flags(compute_dtype)):
        sec = ds.get(name)
        if sec is None:
            if on:
                ds[name] = {"enabled": True}
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f"{name} in {f.src} must be an object like {{\"enabled\": true}}")
        if "enabled" not in sec or _is_auto(sec["enabled"]):
            sec["enabled"] = on
            f.filled.append(f"{name}.enabled={str(on).lower()}")
        elif bool(sec["enabled"]) != on:
            ours = str(compute_dtype).replace("torch.", "")
            raise ConfigError(f"{name}.enabled={str(sec['enabled']).lower()} in {f.src} conflicts with train.precision "
                              f"(resolved to {ours} on this hardware); set train.precision={name if sec['enabled'] else ours} "
                              f"or {name}.enabled to \"auto\"")
        if name == "fp16" and sec.get("enabled"):
            for k, v in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                         ("hysteresis", 2), ("min_loss_scale", 1)):
                f.fill(sec, k, v, f"fp16.{k}")


def _zero(ds: dict, f: _Filler, p, hidden_size: int | None, min_quant_numel: int | None) -> dict:
    """zero_optimization: stage, offload devices, bucket sizes and the ZeRO-3 persistence threshold."""
    z = ds.setdefault("zero_optimization", {})
    if not isinstance(z, dict):
        raise ConfigError(f"zero_optimization in {f.src} must be an object")
    if "stage" in z and not _is_auto(z["stage"]):
        _check_stage(z["stage"], f.src)
    f.agree(z, "stage", p.zero_stage, "zero_optimization.stage", "parallel.zero_stage", add=True)
    _check_stage(z["stage"], f.src)
    _offload_sections(z, f, p)
    from_json = bool(p.deepspeed_config)
    h = hidden_size
    bucket = h * h if h else 500_000_000
    threshold = _persistence_threshold(h, min_quant_numel)
    for key, val in (("reduce_bucket_size", bucket), ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
                     ("stage3_param_persistence_threshold", threshold)):
        if key in z:
            f.fill(z, key, val, f"zero_optimization.{key}")
        elif not from_json and (key == "reduce_bucket_size" or z["stage"] == 3):
            z[key] = val
    if z["stage"] == 3 and "stage3_param_persistence_threshold" not in z:
        # DeepSpeed's default (1e5 elements) replicates packed 4-bit weights of small layers; cap it (see above)
        z["stage3_param_persistence_threshold"] = threshold
    for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
        f.fill(z, key, 1_000_000_000, f"zero_optimization.{key}")
    f.fill(z, "stage3_gather_16bit_weights_on_model_save", False, "zero_optimization.stage3_gather_16bit_weights_on_model_save")
    for key in ("overlap_comm", "contiguous_gradients"):
        f.fill(z, key, True, f"zero_optimization.{key}")
    if not from_json:
        z.setdefault("contiguous_gradients", True)
        z.setdefault("overlap_comm", torch.cuda.is_available())
    return z


def _offload_sections(z: dict, f: _Filler, p) -> None:
    for key in ("offload_optimizer", "offload_param"):
        ours = getattr(p, key)
        sec = z.get(key)
        if isinstance(sec, dict):
            dev = sec.get("device", "none")
            if _is_auto(dev):
                dev = sec["device"] = "cpu" if ours else "none"
                f.filled.append(f"zero_optimization.{key}.device={dev}")
            theirs = dev not in (None, "none")
            if ours != theirs and (ours or explicitly_set(f.cfg, f"parallel.{key}")):
                raise ConfigError(f"zero_optimization.{key}.device={dev!r} in {f.src} conflicts with "
                                  f"parallel.{key}={str(ours).lower()}; make them agree or drop one of them")
            if theirs and "pin_memory" in sec and _is_auto(sec["pin_memory"]):
                sec["pin_memory"] = torch.cuda.is_available()
                f.filled.append(f"zero_optimization.{key}.pin_memory={sec['pin_memory']}")
        elif ours:
            z[key] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if _offloads(z, "offload_param") and z["stage"] != 3:
        raise ConfigError(f"parameter offload needs ZeRO stage 3 (parallel.offload_param / zero_optimization.offload_param"
                          f" with stage {z['stage']} in {f.src}); set parallel.zero_stage=3 or drop the parameter offload")


def _optimizer(ds: dict, f: _Filler, t, z: dict) -> dict | None:
    """An "optimizer" section makes DeepSpeed build it (shardtune's lr/weight decay fill its "auto"); without one
    shardtune passes torch AdamW, which DeepSpeed must be told to accept when the optimizer is offloaded."""
    opt = ds.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or not isinstance(opt.get("params", {}), dict):
            raise ConfigError(f"optimizer in {f.src} must be an object like {{\"type\": \"AdamW\", \"params\": "
                              "{...}}; fix it, or remove the section to use train.optimizer")
        prm = opt.setdefault("params", {})
        f.agree(prm, "lr", t.lr, "optimizer.params.lr", "train.lr", add=False)
        f.agree(prm, "weight_decay", t.weight_decay, "optimizer.params.weight_decay", "train.weight_decay", add=False)
        f.fill(prm, "betas", [0.9, 0.999], "optimizer.params.betas")
        f.fill(prm, "eps", 1e-8, "optimizer.params.eps")
        if t.optimizer != "adamw":
            raise ConfigError(f"an \"optimizer\" section in {f.src} conflicts with train.optimizer={t.optimizer}; "
                              "remove the section to use train.optimizer, or set train.optimizer=adamw")
        if str(opt.get("type", "")).lower() in ("adam", "adamw") and (
                "torch_adam" not in prm or _is_auto(prm["torch_adam"])):
            # DeepSpeed's default Adam is a compiled op (CPU Adam when offloading, fused Adam on GPUs), built with a
            # C++/CUDA toolchain at first use; torch's AdamW needs nothing. "torch_adam": false opts back in.
            prm["torch_adam"] = True
            f.filled.append("optimizer.params.torch_adam=true")
    elif _offloads(z, "offload_optimizer"):
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(f"zero_force_ds_cpu_optimizer=true in {f.src} needs an \"optimizer\" section (shardtune "
                              "otherwise passes torch AdamW); add {\"optimizer\": {\"type\": \"AdamW\", \"params\": "
                              "{\"lr\": \"auto\"}}} or drop the flag")
        ds["zero_force_ds_cpu_optimizer"] = False
    return opt


def _scheduler(ds: dict, f: _Filler, t, opt: dict | None, total_steps: int | None) -> None:
    """A "scheduler" section makes DeepSpeed schedule the LR; its "auto" step counts need the run's steps."""
    sch = ds.get("scheduler")
    if sch is None:
        return
    sp = sch.setdefault("params", {})
    peak = (opt or {}).get("params", {}).get("lr", t.lr)
    for key, val in (("warmup_min_lr", 0.0), ("warmup_max_lr", peak), ("warmup_num_steps", t.warmup_steps),
                     ("total_num_steps", total_steps), ("cos_min_ratio", 0.0)):
        if key in sp and _is_auto(sp[key]):
            if val is None:
                raise ConfigError(f"scheduler.params.{key}=\"auto\" in {f.src} needs the run's step count; "
                                  "set train.max_steps or give a number")
            sp[key] = val
            f.filled.append(f"scheduler.params.{key}={val}")


def _offloads(z: dict, key: str) -> bool:
    sec = z.get(key)
    return isinstance(sec, dict) and sec.get("device", "none") not in (None, "none")


def _find_auto(d: Any, path: str = "") -> str | None:
    if isinstance(d, dict):
        for k, v in d.items():
            hit = _find_auto(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(d, list):
        for i, v in enumerate(d):
            hit = _find_auto(v, f"{path}[{i}]")
            if hit:
                return hit
    elif _is_auto(d):
        return path
    return None


def adopted_from_json(cfg) -> list[str]:
    """'key=value' for each of the JSON's values the run adopts (shardtune keys the user did not set)."""
    if not cfg.parallel.deepspeed_config:
        return []
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config)
    return [f"{k}={v}" for k, v in deepspeed_json_adoptions(cfg, ds).items()]


def describe_filled(filled: list[str], src: str | None, adopted: list[str] = ()) -> str:
    """The one line printed at start: the JSON's values the run adopted, and what shardtune filled in (the "auto"
    ones and defaults it adds)."""
    where = src or "the generated DeepSpeed config"
    parts = []
    if adopted:
        parts.append(f"adopted from {where}: " + ", ".join(adopted))
    if filled:
        parts.append(f"filled in {where} from the shardtune config: " + ", ".join(filled))
    if not parts:
        return f"deepspeed config: {where} used as written (no \"auto\" values)"
    return "deepspeed config: " + "; ".join(parts)


def cast_dtype(ds_cfg: dict) -> torch.dtype | None:
    """The dtype DeepSpeed casts the module's floating-point parameters to (bf16/fp16 mode), None in fp32."""
    if (ds_cfg.get("bf16") or {}).get("enabled") is True:
        return torch.bfloat16
    if (ds_cfg.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    return None
