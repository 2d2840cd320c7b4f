"""Find what a training run produced (adapter, base model, method) and load base + adapter for inference.

Everything that uses a trained adapter (generate, evaluate, export) starts here, so a run directory and a bare PEFT
adapter directory are accepted the same way and a missing piece is reported once, with the fix.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from shardtune.errors import ConfigError, EnvironmentProblem, ModelError
from shardtune.jsonfile import read_json_object
from shardtune.model.bnb_cpu import disable_cpu_weight_packing

log = logging.getLogger(__name__)

RUN_FILE = "shardtune_run.json"
ADAPTER_SUBDIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"

# A hub id is `name` or `org/name`; anything with a leading slash, dot or tilde, or with more parts, is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class RunInfo:
    """What `load_run` found. `base_model` is a local directory or a hub id; `config` is the run's resolved config."""

    adapter_dir: Path
    base_model: str
    method: str = "lora"
    precision: str = "auto"
    run_dir: Optional[Path] = None
    config: dict = field(default_factory=dict)
    data_format: Optional[str] = None
    is_full: bool = False  # method=full: the "adapter" directory holds the whole fine-tuned model

    @property
    def data_cfg(self) -> dict:
        return dict(self.config.get("data") or {})

    @property
    def base_is_local(self) -> bool:
        return Path(self.base_model).expanduser().is_dir()


def _read_json(path: Path) -> dict:
    return read_json_object(path, f"'{path}'", "re-run training or fix the file", ModelError)


def _check_base(base: str, where: str) -> str:
    """Accept an existing local model directory or something shaped like a hub id; refuse a missing path."""
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"base model directory '{base}' (from {where}) has no config.json; "
                             f"pass --base DIR with the Hugging Face model directory the adapter was trained on")
        return str(p)
    if p.exists() or not _HUB_ID.match(base):
        raise ModelError(f"base model '{base}' (from {where}) not found; "
                         f"pass --base DIR with the model directory the adapter was trained on")
    return base  # a hub id: transformers resolves it (cache or download) when loading


def load_run(run_or_adapter_dir: str | Path, base: str | Path | None = None) -> RunInfo:
    """Locate the adapter and the base model of a run directory, a run's `adapter/` or any bare PEFT adapter directory.

    A run directory holds `shardtune_run.json` (config, `base_model_dir`, method, precision) and `adapter/`.
    A bare adapter directory names its base in `adapter_config.json` (`base_model_name_or_path`). `base` overrides
    the recorded base model, e.g. when the run was trained on another machine.
    """
    path = Path(run_or_adapter_dir).expanduser()
    if not path.exists():
        raise ModelError(f"adapter or run directory '{run_or_adapter_dir}' does not exist; "
                         f"pass --adapter with a training run's output.dir or a PEFT adapter directory")
    if not path.is_dir():
        raise ModelError(f"'{run_or_adapter_dir}' is a file; pass --adapter with a directory "
                         f"(a training run's output.dir or a PEFT adapter directory)")

    run_file = None
    if (path / RUN_FILE).is_file():
        run_dir, adapter_dir, run_file = path, path / ADAPTER_SUBDIR, path / RUN_FILE
    elif (path / ADAPTER_CONFIG).is_file() or ((path / "config.json").is_file() and (path.parent / RUN_FILE).is_file()):
        adapter_dir = path
        run_dir = path.parent if (path.parent / RUN_FILE).is_file() else None
        run_file = run_dir / RUN_FILE if run_dir else None
    elif (path / ADAPTER_SUBDIR).is_dir():
        run_dir, adapter_dir = path, path / ADAPTER_SUBDIR
    else:
        raise ModelError(f"'{path}' has neither {RUN_FILE} nor {ADAPTER_CONFIG} nor an {ADAPTER_SUBDIR}/ directory; "
                         f"pass --adapter with a training run's output.dir (written at the end of `shardtune train`) "
                         f"or a PEFT adapter directory")

    if not adapter_dir.is_dir():
        raise ModelError(f"run '{path}' has no {ADAPTER_SUBDIR}/ directory (training did not finish or was saved "
                         f"elsewhere); re-run `shardtune train` or pass --adapter with the adapter directory")
    run: dict[str, Any] = _read_json(run_file) if run_file else {}
    config = run.get("config") or {}
    train = config.get("train") or {}
    method = run.get("method") or train.get("method") or "lora"
    precision = run.get("precision") or train.get("precision") or "auto"
    stats = run.get("data") if isinstance(run.get("data"), dict) else {}
    data_format = run.get("data_format") or stats.get("format") or (config.get("data") or {}).get("format")

    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        if method == "full" and (adapter_dir / "config.json").is_file():
            # Full fine-tuning saves the whole model where an adapter would be; it needs no base.
            return RunInfo(adapter_dir=adapter_dir, base_model=str(adapter_dir), method="full", precision=str(precision),
                           run_dir=run_dir, config=config, data_format=data_format, is_full=True)
        raise ModelError(f"adapter directory '{adapter_dir}' has no {ADAPTER_CONFIG} (not a PEFT adapter, or a "
                         f"partial copy); pass --adapter with a directory written by `shardtune train`")

    adapter_cfg = _read_json(adapter_dir / ADAPTER_CONFIG)

    if base is not None:
        base_model, where = str(base), "--base"
    elif run.get("base_model_dir"):
        base_model, where = str(run["base_model_dir"]), str(run_file)
    elif adapter_cfg.get("base_model_name_or_path"):
        base_model, where = str(adapter_cfg["base_model_name_or_path"]), str(adapter_dir / ADAPTER_CONFIG)
    else:
        raise ModelError(f"no base model recorded in '{adapter_dir / ADAPTER_CONFIG}'; "
                         f"pass --base DIR with the model the adapter was trained on")
    from shardtune.model.gguf import resolve_gguf_base
    base_model = _check_base(resolve_gguf_base(base_model, config.get("model") or {}), where)
    return RunInfo(adapter_dir=adapter_dir, base_model=base_model, method=str(method), precision=str(precision),
                   run_dir=run_dir, config=config, data_format=data_format)


# ---------------------------------------------------------------- devices and dtypes


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'. Asking for CUDA without one is an error, not a fallback."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(f"device '{device}' requested but CUDA is not available; use --device cpu "
                                 f"(or run `shardtune doctor` to see why the GPU is not visible)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device '{device}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(precision: str, device: str):
    """Compute dtype for inference: the run's precision on GPU (auto: bf16 where native, else fp16); fp32 on CPU
    unless bf16 was asked for explicitly, since fp16 matmuls on CPU are slow and gain nothing there."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(precision, precision)
    if device == "cpu":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if precision in names:
        return names[precision]
    major, _ = torch.cuda.get_device_capability(torch.device(device) if ":" in device else 0)
    return torch.bfloat16 if major >= 8 else torch.float16


def _bnb_usable(device: str) -> tuple[bool, str]:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA library mismatch raised at import
        return False, f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
    if device == "cpu":
        from importlib.metadata import version

        from packaging.version import Version
        if Version(version("bitsandbytes")) < Version("0.46"):
            return False, f"bitsandbytes {version('bitsandbytes')} has no CPU 4-bit kernels (needs >= 0.46)"
    return True, ""


def _device_map(device: str):
    if device == "cpu":
        return {"": "cpu"}
    if device == "cuda":
        return "auto"  # spread a model that does not fit one GPU over all visible GPUs
    return {"": device}


def load_tokenizer(info: RunInfo):
    """The tokenizer saved with the adapter (it carries the chat template training used), else the base model's."""
    from transformers import AutoTokenizer

    src = info.adapter_dir if (info.adapter_dir / "tokenizer_config.json").is_file() else info.base_model
    trust = bool((info.config.get("model") or {}).get("trust_remote_code", False))
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from '{src}' ({str(e).splitlines()[0]}); "
                         f"pass --base DIR with a model directory that has tokenizer files") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(info: RunInfo, dtype, device: str, quantize: Optional[str] = None):
    """Load the base model in `dtype`, or quantized ('4bit' / '8bit') through bitsandbytes."""
    from transformers import AutoModelForCausalLM

    model_cfg = info.config.get("model") or {}
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map=_device_map(device),
                                  trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        quant = info.config.get("quant") or {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)), bnb_4bit_compute_dtype=dtype)
    elif quantize == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    try:
        return AutoModelForCausalLM.from_pretrained(info.base_model, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load base model '{info.base_model}' ({str(e).splitlines()[0]}); "
                         f"pass --base DIR with the local model directory the adapter was trained on") from None


def attach_adapter(model, info: RunInfo):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(info.adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        # Size mismatches and missing modules land here when the adapter was trained on another base.
        first = str(e).strip().splitlines()[0][:300]
        raise ModelError(f"adapter '{info.adapter_dir}' does not fit base model '{info.base_model}' ({first}); "
                         f"pass --base DIR with the model the adapter was trained on") from None


def load_for_inference(run_dir: str | Path, device: str = "auto", load_in_4bit: Optional[bool] = None,
                       base: str | Path | None = None, dtype=None, info: Optional[RunInfo] = None):
    """Load base + adapter for generation or evaluation; returns (model in eval mode, tokenizer).

    load_in_4bit=None follows the run: a qlora adapter is evaluated on the 4-bit base it was trained against (the
    numbers then match training), an int8 adapter on the 8-bit base, others on the base in the compute dtype. When
    bitsandbytes cannot run on this device the base is loaded unquantized instead, and that is logged.
    """
    info = info or load_run(run_dir, base=base)
    dev = resolve_device(device)
    torch_dtype = dtype or resolve_dtype(info.precision, dev)

    quantize: Optional[str] = None
    if info.is_full:
        load_in_4bit = False
    if load_in_4bit is True:
        ok, why = _bnb_usable(dev)
        if not ok:
            raise EnvironmentProblem(f"load_in_4bit requested but {why}; install bitsandbytes >= 0.46 "
                                     f"or load without 4-bit")
        quantize = "4bit"
    elif load_in_4bit is None and info.method in ("qlora", "int8"):
        ok, why = _bnb_usable(dev)
        if ok:
            quantize = "4bit" if info.method == "qlora" else "8bit"
        else:
            log.warning("run was trained with method=%s but %s; loading the base in %s instead (outputs can differ "
                        "slightly from training)", info.method, why, str(torch_dtype).replace("torch.", ""))

    tokenizer = load_tokenizer(info)
    model = load_base_model(info, torch_dtype, dev, quantize)
    disable_cpu_weight_packing(model)  # generate/evaluate run eval + no_grad on CPU (see shardtune.model.bnb_cpu)
    if not info.is_full:
        model = attach_adapter(model, info)
    model.eval()
    return model, tokenizer
