"""The DeepSpeed config: built from shardtune's config, or taken from a user's JSON (parallel.deepspeed_config) with its
Hugging Face-style "auto" values filled from shardtune's config.

Rules for a user JSON (documented in docs/distributed.md):
- "auto" is replaced by shardtune's value; `build_ds_config` returns the list of what it filled (the engine prints it
  in one line).
- Batch shape and precision must agree with what the training loop feeds: a number that differs from shardtune's value
  (train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size, fp16/bf16.enabled) is a ConfigError
  naming both sides.
- Other numbers (gradient_clipping, the optimizer's lr/weight_decay/betas/eps, zero stage, offload devices) are the
  JSON's to decide, unless the shardtune config also sets that key to a non-default value that differs: then it is a
  ConfigError naming both (shardtune cannot tell an explicit default from an unset key, so the default yields).
- An "optimizer" section makes DeepSpeed build the optimizer (DeepSpeedCPUAdam when offloading, a compiled op);
  without one shardtune passes torch AdamW. A "scheduler" section makes DeepSpeed schedule the LR; without one,
  shardtune's warmup + train.schedule runs on DeepSpeed's optimizer.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from shardtune.errors import ConfigError
from shardtune.jsonfile import read_json_object

AUTO = "auto"
QUIET_STEPS = 10**9  # DeepSpeed prints progress every steps_per_print; shardtune logs itself


def _default(section: str, key: str):
    from shardtune.config import RunConfig
    sec = getattr(RunConfig(), section)
    return getattr(sec, key)


def _is_auto(v) -> bool:
    return isinstance(v, str) and v.strip().lower() == AUTO


class _Filler:
    """Fills "auto" values of one JSON dict and records what it did."""

    def __init__(self, src: str):
        self.src = src
        self.filled: list[str] = []

    def fill(self, d: dict, key: str, value, path: str) -> None:
        if key in d and _is_auto(d[key]):
            d[key] = value
            self.filled.append(f"{path}={value}")

    def must_match(self, d: dict, key: str, ours, path: str, our_key: str) -> None:
        """A value the loop depends on: 'auto' or absent takes ours; a different number is a conflict."""
        if key not in d or _is_auto(d[key]):
            if key in d:
                self.filled.append(f"{path}={ours}")
            d[key] = ours
            return
        if d[key] != ours:
            raise ConfigError(f"{path}={d[key]!r} in {self.src} conflicts with {our_key}={ours!r}; make them equal "
                              f"or set {path} to \"auto\"")

    def json_wins(self, d: dict, key: str, ours, path: str, our_key: str, is_default: bool) -> None:
        """A value the JSON may decide: 'auto' takes ours; a number differing from a non-default ours conflicts."""
        if key not in d:
            return
        if _is_auto(d[key]):
            d[key] = ours
            self.filled.append(f"{path}={ours}")
            return
        if not is_default and d[key] != ours:
            raise ConfigError(f"{path}={d[key]!r} in {self.src} conflicts with {our_key}={ours!r}; remove one of "
                              f"them or make them equal")


def _precision_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    return dtype == torch.bfloat16, dtype == torch.float16


def _load_json(path: str) -> dict:
    return read_json_object(path, f"parallel.deepspeed_config '{path}'", "fix the file or drop the setting",
                            ConfigError, missing="pass the path of a DeepSpeed JSON file")


def _persistence_threshold(hidden_size: int | None, min_quant_numel: int | None) -> int:
    """Parameters smaller than this stay replicated under ZeRO-3 (saves gathers of norms and biases). HF's 10 x hidden
    would also keep small packed 4-bit weights whole on every rank, so it is capped below the smallest of those."""
    t = 10 * hidden_size if hidden_size else 100_000
    if min_quant_numel:
        t = min(t, max(min_quant_numel - 1, 0))
    return t


def build_ds_config(cfg, world_size: int, *, compute_dtype: torch.dtype | None = None, hidden_size: int | None = None,
                    total_steps: int | None = None, min_quant_numel: int | None = None) -> tuple[dict, list[str]]:
    """(DeepSpeed config dict, list of 'key=value' filled from shardtune's config).

    compute_dtype: the run's dtype (default: from train.precision, fp32 for 'auto'); hidden_size: the model's, for the
    bucket sizes; total_steps: for a JSON scheduler's "auto" step counts; min_quant_numel: elements of the smallest
    packed 4-bit weight (keeps ZeRO-3 from replicating it)."""
    t, p = cfg.train, cfg.parallel
    if compute_dtype is None:
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    bf16, fp16 = _precision_flags(compute_dtype)
    micro, accum = t.micro_batch_size, t.grad_accum
    if p.deepspeed_config:
        src = p.deepspeed_config
        ds = copy.deepcopy(_load_json(src))
    else:
        src = "the generated DeepSpeed config"
        ds = {"zero_optimization": {"stage": p.zero_stage}}
    f = _Filler(src)

    # -- batch shape: what the loop feeds
    f.must_match(ds, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu", "train.micro_batch_size")
    f.must_match(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps", "train.grad_accum")
    f.must_match(ds, "train_batch_size", micro * accum * world_size, "train_batch_size",
                 f"train.micro_batch_size x train.grad_accum x {world_size} ranks")

    # -- precision: the loop's autocast dtype
    for name, on in (("bf16", bf16), ("fp16", fp16)):
        sec = ds.get(name)
        if sec is None:
            if on:
                ds[name] = {"enabled": True}
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f"{name} in {src} must be an object like {{\"enabled\": true}}")
        if "enabled" not in sec or _is_auto(sec["enabled"]):
            sec["enabled"] = on
            f.filled.append(f"{name}.enabled={str(on).lower()}")
        elif bool(sec["enabled"]) != on:
            ours = str(compute_dtype).replace("torch.", "")
            raise ConfigError(f"{name}.enabled={str(sec['enabled']).lower()} in {src} conflicts with train.precision "
                              f"(resolved to {ours} on this hardware); set train.precision={name if sec['enabled'] else ours} "
                              f"or {name}.enabled to \"auto\"")
        if name == "fp16" and sec.get("enabled"):
            for k, v in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                         ("hysteresis", 2), ("min_loss_scale", 1)):
                f.fill(sec, k, v, f"fp16.{k}")

    # -- clipping
    clip_default = t.grad_clip == _default("train", "grad_clip")
    if "gradient_clipping" in ds:
        f.json_wins(ds, "gradient_clipping", t.grad_clip, "gradient_clipping", "train.grad_clip", clip_default)
    else:
        ds["gradient_clipping"] = t.grad_clip

    # -- ZeRO
    z = ds.setdefault("zero_optimization", {})
    if not isinstance(z, dict):
        raise ConfigError(f"zero_optimization in {src} must be an object")
    stage_default = p.zero_stage == _default("parallel", "zero_stage")
    if "stage" not in z:
        z["stage"] = p.zero_stage
    else:
        f.json_wins(z, "stage", p.zero_stage, "zero_optimization.stage", "parallel.zero_stage", stage_default)
    if z["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={z['stage']!r} in {src}; use 2 or 3")
    for key, flag in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param")):
        ours = getattr(p, flag)
        sec = z.get(key)
        if isinstance(sec, dict):
            dev = sec.get("device", "none")
            if _is_auto(dev):
                dev = sec["device"] = "cpu" if ours else "none"
                f.filled.append(f"zero_optimization.{key}.device={dev}")
            theirs = dev not in (None, "none")
            if ours and not theirs:
                raise ConfigError(f"zero_optimization.{key}.device={dev!r} in {src} conflicts with parallel.{flag}=true")
            if theirs and "pin_memory" in sec and _is_auto(sec["pin_memory"]):
                sec["pin_memory"] = torch.cuda.is_available()
                f.filled.append(f"zero_optimization.{key}.pin_memory={sec['pin_memory']}")
        elif ours:
            z[key] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if _offloads(z, "offload_param") and z["stage"] != 3:
        raise ConfigError(f"parameter offload needs ZeRO stage 3 (parallel.offload_param / zero_optimization.offload_param"
                          f" with stage {z['stage']} in {src}); set parallel.zero_stage=3 or drop the parameter offload")
    h = hidden_size
    bucket = h * h if h else 500_000_000
    for key, val in (("reduce_bucket_size", bucket), ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
                     ("stage3_param_persistence_threshold", _persistence_threshold(h, min_quant_numel))):
        if key in z:
            f.fill(z, key, val, f"zero_optimization.{key}")
        elif not p.deepspeed_config and (key == "reduce_bucket_size" or z["stage"] == 3):
            z[key] = val
    if z["stage"] == 3 and "stage3_param_persistence_threshold" not in z:
        # DeepSpeed's default (1e5 elements) replicates packed 4-bit weights of small layers; cap it (see above)
        z["stage3_param_persistence_threshold"] = _persistence_threshold(h, min_quant_numel)
    for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"):
        f.fill(z, key, 1_000_000_000, f"zero_optimization.{key}")
    f.fill(z, "stage3_gather_16bit_weights_on_model_save", False, "zero_optimization.stage3_gather_16bit_weights_on_model_save")
    for key in ("overlap_comm", "contiguous_gradients"):
        f.fill(z, key, True, f"zero_optimization.{key}")
    if not p.deepspeed_config:
        z.setdefault("contiguous_gradients", True)
        z.setdefault("overlap_comm", torch.cuda.is_available())

    # -- optimizer and scheduler
    opt = ds.get("optimizer")
    if opt is not None:
        prm = opt.setdefault("params", {})
        lr_default = t.lr == _default("train", "lr")
        wd_default = t.weight_decay == _default("train", "weight_decay")
        f.json_wins(prm, "lr", t.lr, "optimizer.params.lr", "train.lr", lr_default)
        f.json_wins(prm, "weight_decay", t.weight_decay, "optimizer.params.weight_decay", "train.weight_decay", wd_default)
        f.fill(prm, "betas", [0.9, 0.999], "optimizer.params.betas")
        f.fill(prm, "eps", 1e-8, "optimizer.params.eps")
        if t.optimizer != "adamw":
            raise ConfigError(f"an \"optimizer\" section in {src} conflicts with train.optimizer={t.optimizer}; "
                              "remove the section to use train.optimizer, or set train.optimizer=adamw")
        if str(opt.get("type", "")).lower() in ("adam", "adamw") and (
                "torch_adam" not in prm or _is_auto(prm["torch_adam"])):
            # DeepSpeed's default Adam is a compiled op (CPU Adam when offloading, fused Adam on GPUs), built with a
            # C++/CUDA toolchain at first use; torch's AdamW needs nothing. "torch_adam": false opts back in.
            prm["torch_adam"] = True
            f.filled.append("optimizer.params.torch_adam=true")
    elif _offloads(z, "offload_optimizer"):
        # shardtune passes torch AdamW; DeepSpeed insists on its compiled CPU Adam unless told otherwise
        if ds.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(f"zero_force_ds_cpu_optimizer=true in {src} needs an \"optimizer\" section (shardtune "
                              "otherwise passes torch AdamW); add {\"optimizer\": {\"type\": \"AdamW\", \"params\": "
                              "{\"lr\": \"auto\"}}} or drop the flag")
        ds["zero_force_ds_cpu_optimizer"] = False
    sch = ds.get("scheduler")
    if sch is not None:
        sp = sch.setdefault("params", {})
        peak = (opt or {}).get("params", {}).get("lr", t.lr)
        for key, val in (("warmup_min_lr", 0.0), ("warmup_max_lr", peak), ("warmup_num_steps", t.warmup_steps),
                         ("total_num_steps", total_steps), ("cos_min_ratio", 0.0)):
            if key in sp and _is_auto(sp[key]):
                if val is None:
                    raise ConfigError(f"scheduler.params.{key}=\"auto\" in {src} needs the run's step count; "
                                      "set train.max_steps or give a number")
                sp[key] = val
                f.filled.append(f"scheduler.params.{key}={val}")

    ds.setdefault("steps_per_print", QUIET_STEPS)
    ds.setdefault("wall_clock_breakdown", False)
    left = _find_auto(ds)
    if left:
        raise ConfigError(f"{left}=\"auto\" in {src}: shardtune has no value to fill it with; give a number")
    return ds, f.filled


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


def describe_filled(filled: list[str], src: str | None) -> str:
    """The one line printed at start: which values shardtune filled in (the "auto" ones and defaults it adds)."""
    where = src or "the generated DeepSpeed config"
    if not filled:
        return f"deepspeed config: {where} used as written (no \"auto\" values)"
    return f"deepspeed config: filled in {where} from the shardtune config: " + ", ".join(filled)
