"""Spellings people bring from other trainers (HF Trainer, axolotl, LLaMA-Factory) mapped to shardtune's keys.

Names with the same meaning are accepted as aliases (a note says what they became); names whose meaning or values
differ get a one-line hint that names the shardtune key instead. Used by config.py (YAML keys, key=value) and
cli.py (`--key value` options).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

# other tool's name -> shardtune key, same meaning and same values
ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.grad_clip",
    "seed": "train.seed",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "lr_scheduler_type": "train.schedule",
    "lr_scheduler": "train.schedule",
    "output_dir": "output.dir",
    "report_to": "output.report_to",
    "lora_r": "lora.rank",
    "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_target": "lora.target_modules",
    "deepspeed": "parallel.deepspeed_config",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "trust_remote_code": "model.trust_remote_code",
    "max_seq_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
}


def _flag(key: str, value_if_true: Any) -> Callable[[Any], Optional[tuple[str, Any]]]:
    # boolean switches of other tools that select one shardtune value; `false` has no single meaning here
    return lambda v: (key, value_if_true) if v is True or str(v).lower() in ("true", "1", "yes") else None


# name -> translation of its value (None: cannot translate this value; the hint below is shown instead)
TRANSLATE: dict[str, Callable[[Any], Optional[tuple[str, Any]]]] = {
    "load_in_4bit": _flag("train.method", "qlora"),
    "load_in_8bit": _flag("train.method", "int8"),
    "bf16": _flag("train.precision", "bf16"),
    "fp16": _flag("train.precision", "fp16"),
    "resume_from_checkpoint": _flag("train.resume", True),
}

# name -> how shardtune says it, for names it does not accept as they are
HINTS: dict[str, str] = {
    "load_in_4bit": "train.method=qlora",
    "load_in_8bit": "train.method=int8",
    "bf16": "train.precision=bf16",
    "fp16": "train.precision=fp16",
    "resume_from_checkpoint": "train.resume=true (resumes from the latest checkpoint in output.dir; set output.dir "
                              "to the run that wrote it)",
    "config": "the YAML as a positional argument: shardtune train x.yaml",
    "optim": "train.optimizer=adamw | adamw_8bit | paged_adamw_8bit",
    "dataset": "data.path=<file.jsonl>",
    "datasets": "data.path=<file.jsonl>",
    "data_path": "data.path=<file.jsonl>",
    "train_file": "data.path=<file.jsonl>",
    "val_set_size": "data.val_fraction=<fraction held out>",
    "adapter": "train.method=lora | qlora",
    "finetuning_type": "train.method=lora | full",
    "quantization_bit": "train.method=qlora (4 bits) or train.method=int8 (8 bits)",
    "per_device_eval_batch_size": "train.micro_batch_size (one micro batch size serves training and eval)",
    "logging_dir": "output.dir (TensorBoard files go to <output.dir>/tensorboard)",
    "warmup_ratio": "train.warmup_steps=<steps>",
    "eval_strategy": "train.eval_every=<steps> (0 disables)",
    "evaluation_strategy": "train.eval_every=<steps> (0 disables)",
    "save_strategy": "train.save_every=<steps> (0: only at the end)",
    "nproc_per_node": "--nproc N",
    "num_gpus": "--nproc N",
    "wandb_project": "output.report_to=wandb (the project comes from WANDB_PROJECT)",
    "model": "model.name_or_path=<dir or hub id>",
}


def _norm(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def translate(name: str, value: Any) -> Optional[tuple[str, Any]]:
    """(shardtune key, value) for another tool's `name: value`, or None when it is not accepted as is."""
    n = _norm(name)
    if n in ALIASES:
        return ALIASES[n], value
    if n in TRANSLATE:
        return TRANSLATE[n](value)
    return None


def hint(name: str, value: Any = None) -> Optional[str]:
    """How shardtune spells `name` (with `value` filled in where it maps one to one), or None if unknown."""
    n = _norm(name)
    if n in ALIASES:
        return f"{ALIASES[n]}={value}" if value is not None else f"{ALIASES[n]}=<value>"
    return HINTS.get(n)
