"""Resolve and check a model directory, pick device and precision, load the base (full / 8-bit / 4-bit), add LoRA.

This is the one-process path built on `from_pretrained`. Sharded engines may build the same model on the meta device
and stream weights instead (shardtune.model.stream); both end at the same modules and dtypes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from shardtune.errors import EnvironmentProblem, ModelError
from shardtune.model.bnb_cpu import disable_cpu_weight_packing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Quantization methods whose checkpoints hold already-quantized weights; none of them can be a QLoRA base.
PREQUANTIZED = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "bnb": "bitsandbytes", "aqlm": "AQLM",
    "eetq": "EETQ", "hqq": "HQQ", "exl2": "EXL2", "fp8": "FP8", "compressed-tensors": "compressed-tensors",
    "gguf": "GGUF", "quanto": "quanto", "torchao": "torchao", "mxfp4": "MXFP4", "fbgemm_fp8": "FP8",
}


# ------------------------------------------------------------------------------------------------ device, precision

def resolve_device(tcfg, local_rank: int = 0) -> torch.device:
    if tcfg.device == "cpu":
        return torch.device("cpu")
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(tcfg, device: torch.device) -> torch.dtype:
    """The compute dtype on `device`, decided by shardtune.resolve.resolve_precision (shared with plan and doctor)."""
    from shardtune.resolve import resolve_precision as decide
    if device.type == "cpu":
        return DTYPES[decide(tcfg.precision, on_gpu=False)]
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    name = torch.cuda.get_device_name(device) if not has_bf16 else "this GPU"
    return DTYPES[decide(tcfg.precision, on_gpu=True, gpu_bf16=has_bf16, gpu_name=name)]


# ------------------------------------------------------------------------------------------------ model directory

def resolve_model_dir(mcfg) -> Path:
    """A local directory with config.json: the builtin tiny model, a user's dir, a GGUF file's dequantized copy, or a
    hub id fetched when online."""
    name = mcfg.name_or_path
    from shardtune.model.gguf import dequantized_model_dir, gguf_source
    gguf = gguf_source(mcfg)
    if gguf is not None:
        return dequantized_model_dir(gguf)
    if name.startswith("builtin:"):
        if name != "builtin:tiny-llama":
            raise ModelError(f"model.name_or_path '{name}' is not a built-in model; the built-in one is builtin:tiny-llama")
        from shardtune.builtin.tiny_model import builtin_model_dir
        return builtin_model_dir()
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model.name_or_path '{name}' is a file; pass the model's directory (with config.json)")
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory '{name}' has no config.json; pass a Hugging Face model directory "
                             "(config.json + *.safetensors + tokenizer files)")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"model.name_or_path '{name}' does not exist; pass a local model directory or a hub id "
                         "like meta-llama/Llama-3.1-8B")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(name, revision=mcfg.revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"])
    except Exception as e:  # offline, gated, missing
        raise ModelError(f"model '{name}' is not a local directory and could not be fetched from the hub "
                         f"({type(e).__name__}); download it first or pass a local directory") from None
    return Path(local)


def read_model_config(model_dir: Path, trust_remote_code: bool = False) -> dict:
    """config.json, checked for things shardtune cannot train: pre-quantized weights, unknown or remote-code models."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{model_dir}/config.json is unreadable ({e}); re-download the model") from None
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict):
        kind = str(qc.get("quant_method", "unknown")).lower()
        label = PREQUANTIZED.get(kind, kind)
        raise ModelError(
            f"{model_dir} is a pre-quantized {label} checkpoint; its weights cannot be re-quantized for QLoRA or "
            "trained in full. Use the original bf16/fp16 checkpoint of the same model (shardtune quantizes it on "
            "load with method=qlora), or train LoRA on the quantized model with a library that supports that format")
    mt = cfg.get("model_type")
    if not mt:
        raise ModelError(f"{model_dir}/config.json has no model_type; is this a Hugging Face transformers model?")
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    # encoders (bert, roberta, ...) and encoder-decoders (bart, t5-likes) have a causal-LM class too, but it is a
    # decoder head that only works when the checkpoint was trained as a decoder (is_decoder: true)
    encoder = (mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES or mt in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
               or cfg.get("is_encoder_decoder"))
    if encoder and not cfg.get("is_decoder"):
        raise ModelError(f"model type '{mt}' in {model_dir} is an encoder or encoder-decoder model, not a causal LM; "
                         "use a decoder-only model (llama, mistral, qwen2, ...)")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if "auto_map" in cfg:
            if not trust_remote_code:
                raise ModelError(f"model type '{mt}' in {model_dir} ships its own code; set model.trust_remote_code=true "
                                 "if you trust it")
        else:
            raise ModelError(f"model type '{mt}' in {model_dir} is not a causal LM known to transformers; "
                             "use a decoder-only model (llama, mistral, qwen2, ...) or upgrade transformers")
    return cfg


# ------------------------------------------------------------------------------------------------ loading

def quantization_config(cfg, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    m = cfg.train.method
    if m == "qlora":
        # quant_storage == compute dtype lets FSDP/ZeRO-3 treat the packed 4-bit bytes as ordinary shardable params.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
                                  bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype)
    if m == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(cfg, model_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """from_pretrained with the method's quantization, frozen, on `device`."""
    from transformers import AutoModelForCausalLM
    qc = quantization_config(cfg, dtype)
    if qc is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise EnvironmentProblem(f"train.method={cfg.train.method} needs bitsandbytes; pip install bitsandbytes") from None
    # full fine-tuning keeps fp32 master weights and computes under autocast; adapters train on a base in `dtype`.
    load_dtype = torch.float32 if cfg.train.method == "full" else dtype
    kw = dict(dtype=load_dtype, attn_implementation=cfg.model.attn_implementation,
              trust_remote_code=cfg.model.trust_remote_code, low_cpu_mem_usage=True)
    if qc is not None:
        kw["quantization_config"] = qc
        kw["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    from safetensors import SafetensorError
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelError(weights_problem(model_dir) or f"could not load model from {model_dir}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if qc is None:
        model.to(device)
    model.config.use_cache = False
    disable_cpu_weight_packing(model)  # else a CPU eval forward repacks 4-bit weights in place (see bnb_cpu)
    return model


def weights_problem(model_dir: Path) -> str | None:
    """Why the weight files of `model_dir` cannot be read (None if they look fine): none there, or one truncated or
    damaged (safetensors checks that its header and data cover the file)."""
    from safetensors import safe_open
    files = sorted(model_dir.glob("*.safetensors"))
    if not files and not any(model_dir.glob("*.bin")):
        return (f"model directory {model_dir} has no weight files (*.safetensors); download the complete model, "
                "or set model.random_init=true to train from random weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # SafetensorError for a truncated header or data; OSError for unreadable files
            return f"{f} is damaged or truncated ({str(e).splitlines()[0]}); re-download the model"
    return None


def add_lora(model: nn.Module, cfg) -> nn.Module:
    """Freeze the base and wrap it with peft LoRA (adapters in fp32; the forward runs under autocast)."""
    from peft import LoraConfig, get_peft_model
    for p in model.parameters():
        p.requires_grad_(False)
    lc = cfg.lora
    targets = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
    pcfg = LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                      modules_to_save=list(lc.modules_to_save) or None, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, pcfg, autocast_adapter_dtype=True)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"lora.target_modules={lc.target_modules!r}: {str(e).splitlines()[0]} This model's "
                         f"linear layers: {', '.join(linear)}; pick from those or use lora.target_modules=all-linear"
                         ) from None
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def enable_checkpointing(model: nn.Module, layers: int | None = None, policy: str = "layer") -> int:
    """Recompute decoder layers in backward: all of them, or `layers` of them spread evenly over the depth (the peak
    holds every saved activation at the end of the forward, so which ones does not change it; spreading keeps the
    recompute cost even across FSDP units). policy="selective": those layers keep their matmul and attention
    outputs and recompute only the cheap ops (model/selective_checkpoint.py). Returns how many layers recompute."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        from shardtune.model.selective_checkpoint import context_fn, lora_small_k
        kwargs["context_fn"] = context_fn(lora_small_k(model))
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False
    blocks = checkpointed_blocks(base)
    if layers is None or layers >= len(blocks):
        return len(blocks)
    chosen = set(spread(len(blocks), max(0, layers)))
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i in chosen
    return len(chosen)


def checkpointed_blocks(base: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]


def spread(n: int, k: int) -> list[int]:
    """k indices of range(n), evenly spaced (k <= n)."""
    return sorted({(i * n) // k for i in range(k)}) if k else []


def build_model(cfg, model_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Base + method: the full trainable model for one process (or one replica before an engine shards it)."""
    model = load_base_model(cfg, model_dir, device, dtype)
    if cfg.train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.train.checkpoint_layers, cfg.train.checkpoint_policy)
    return model


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a tokenizer from {model_dir} ({str(e).splitlines()[0]}); "
                         "the model directory needs tokenizer files") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
