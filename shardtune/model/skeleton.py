"""The model of a checkpoint on the meta device, with no memory behind it: the load dtype, the linear layers the
method quantizes already bitsandbytes layers (same names and skips as from_pretrained + BitsAndBytesConfig), and LoRA
adapters that are real and initialised exactly as on a loaded model."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from shardtune.model.quantize import QuantSpec, packed_4bit_shape, quant_spec

def _should_skip(name: str, patterns) -> bool:
    # transformers' rule: a pattern matches from the start up to a module boundary, as a regex, or as a suffix.
    for p in patterns:
        if name.endswith(p) or re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name):
            return True
    return False


def modules_not_quantized(model: nn.Module) -> set[str]:
    """Linear layers transformers' bitsandbytes integration keeps in full precision: the output embedding (lm_head),
    anything tied to another weight, the module of the last parameter, and the model's _keep_in_fp32_modules."""
    names: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names |= set(tied) | set(tied.values())
    seen: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):  # weights shared between modules are tied too
        if id(p) in seen:
            names |= {n, seen[id(p)]}
        seen.setdefault(id(p), n)
    params = list(model.named_parameters())
    if params:
        names.add(params[-1][0])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {n.removesuffix(".weight") for n in names}


def _replace_linears(model: nn.Module, spec: QuantSpec, qc) -> int:
    """Swap nn.Linear (and GPT-2's Conv1D) for bitsandbytes layers on the meta device; returns how many."""
    import bitsandbytes as bnb
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    skip = modules_not_quantized(model)
    todo = [(n, m) for n, m in model.named_modules()
            if (type(m) is nn.Linear or (Conv1D and isinstance(m, Conv1D))) and not _should_skip(n, skip)]
    for name, old in todo:
        if Conv1D and isinstance(old, Conv1D):
            in_f, out_f = old.weight.shape
        else:
            in_f, out_f = old.in_features, old.out_features
        has_bias = old.bias is not None
        with torch.device("meta"):
            if spec.is_4bit:
                new = bnb.nn.Linear4bit(in_f, out_f, has_bias, spec.compute_dtype,
                                        compress_statistics=spec.double_quant, quant_type=spec.kind,
                                        quant_storage=spec.storage)
                # The packed shape already: a sharding engine must shard the storage that will exist, not [out, in].
                new.weight = bnb.nn.Params4bit(
                    torch.empty(packed_4bit_shape(in_f * out_f, spec.storage), dtype=spec.storage), requires_grad=False,
                    compress_statistics=spec.double_quant, quant_type=spec.kind, quant_storage=spec.storage, module=new,
                    bnb_quantized=True)
            else:
                new = bnb.nn.Linear8bitLt(in_f, out_f, has_bias, has_fp16_weights=qc.llm_int8_has_fp16_weight,
                                          threshold=qc.llm_int8_threshold)
                new.weight = bnb.nn.Int8Params(torch.empty((out_f, in_f), dtype=torch.int8), requires_grad=False,
                                               has_fp16_weights=False)
            if has_bias:
                new.bias = nn.Parameter(torch.empty((out_f,), dtype=old.bias.dtype), requires_grad=False)
        new.source_cls = type(old)
        new.requires_grad_(False)
        model.set_submodule(name, new)
    return len(todo)


def _mark_quantized(model: nn.Module, qc) -> None:
    """The attributes from_pretrained's bitsandbytes quantizer leaves on the model (peft and save_pretrained read
    them)."""
    from transformers.modeling_utils import PreTrainedModel
    from transformers.quantizers import AutoHfQuantizer
    model.is_quantized = True
    model.quantization_method = qc.quant_method
    if qc.load_in_4bit:
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True
    model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    model.config.quantization_config = qc
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.config._is_quantized = True


def build_skeleton(cfg, model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The model of `model_dir` on the meta device, in the load dtype (fp32 for full fine-tuning, like build_model),
    with the linear layers that the method quantizes already bitsandbytes Linear4bit / Linear8bitLt."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from shardtune.model.load import quantization_config, read_model_config
    model_dir = Path(model_dir)
    read_model_config(model_dir, cfg.model.trust_remote_code)  # rejects pre-quantized / unknown architectures
    hf_cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    load_dtype = torch.float32 if cfg.train.method == "full" else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=load_dtype,
                                                 attn_implementation=cfg.model.attn_implementation,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    qc = quantization_config(cfg, dtype)
    if qc is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            from shardtune.errors import EnvironmentProblem
            raise EnvironmentProblem(f"train.method={cfg.train.method} needs bitsandbytes; "
                                     "pip install bitsandbytes") from None
        _replace_linears(model, quant_spec(cfg, dtype), qc)
        _mark_quantized(model, qc)
    model.name_or_path = str(model_dir)
    model.config._name_or_path = str(model_dir)
    if (model_dir / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
        except (OSError, ValueError):
            pass  # from_pretrained also falls back to the config-derived generation config
    model.config.use_cache = False
    model.eval()  # as from_pretrained leaves it; the training loop switches to train()
    return model


def _placeholder(p: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A zero-size real parameter of p's class, dtype and attributes on `device` (what peft inspects)."""
    import bitsandbytes as bnb
    empty = torch.empty(0, dtype=p.dtype, device=device)
    if isinstance(p, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(empty, requires_grad=False, blocksize=p.blocksize,
                                 compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                 quant_storage=p.quant_storage, module=p.module, bnb_quantized=True)
    if isinstance(p, bnb.nn.Int8Params):
        return bnb.nn.Int8Params(empty, requires_grad=False, has_fp16_weights=p.has_fp16_weights)
    return nn.Parameter(empty, requires_grad=p.requires_grad)


def add_lora_to_skeleton(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """shardtune.model.load.add_lora on a meta skeleton, with adapters that are real and initialised exactly as on a
    loaded model.

    peft creates LoRA weights on the CPU (drawing from the same RNG stream as on a loaded model) and then moves them to
    the device and dtype of the base weight. With a meta base that move would discard them, so during the call every
    meta parameter is swapped for a zero-size stand-in of the same class, dtype and bnb attributes on `device`; after
    it the meta parameters come back (frozen, as add_lora leaves the base)."""
    from shardtune.model.load import add_lora
    stand_in: dict[int, nn.Parameter] = {}
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                ph = stand_in.setdefault(id(p), _placeholder(p, device))
                module._parameters[name] = ph
                swapped.append((module, name, p, ph))
    model = add_lora(model, cfg)
    for module, name, meta, ph in swapped:
        meta.requires_grad_(ph.requires_grad)
        if module._parameters.get(name) is ph:
            module._parameters[name] = meta
    # modules_to_save: peft deep-copied the module while it held stand-ins; give the copies meta weights of the real
    # shape so materialize() fills them from the checkpoint like the original.
    for wrapper in model.modules():
        if hasattr(wrapper, "original_module") and hasattr(wrapper, "modules_to_save"):
            for copy in wrapper.modules_to_save.values():
                for pname, p in list(copy.named_parameters()):
                    orig = wrapper.original_module.get_parameter(pname)
                    if p.numel() == 0 and orig.numel() > 0:
                        owner, _, attr = pname.rpartition(".")
                        mod = copy.get_submodule(owner) if owner else copy
                        mod._parameters[attr] = nn.Parameter(torch.empty(orig.shape, dtype=p.dtype, device="meta"),
                                                             requires_grad=p.requires_grad)
    return model
