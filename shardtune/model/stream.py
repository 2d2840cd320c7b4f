"""Load a checkpoint bigger than one GPU and than CPU RAM: meta skeleton, streamed safetensors, quantize on load,
rank-local placement.

The one-process path (`shardtune.model.load.build_model`) calls `from_pretrained`, which needs the whole model on one
device. Here the model is built on the meta device (no memory), LoRA is added to that skeleton, a sharding engine may
shard it (FSDP2 `fully_shard` works on meta parameters), and only then are the weights streamed in: each checkpoint
tensor is read a few MiB at a time from the memory-mapped safetensors file, cast to the compute dtype, moved to the
device, quantized there (NF4/FP4 or LLM.int8), handed to a `place` callback that keeps only this rank's part, and
freed. Host memory therefore holds one chunk at a time; device memory one tensor plus what the rank keeps.

The result (types, names, dtypes, 4-bit data and quantization constants, LoRA initialisation) equals what
`build_model` produces with `from_pretrained` + BitsAndBytesConfig; tests/model/test_stream_equivalence.py checks it.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from shardtune.errors import ModelError
from shardtune.model.quantize import Chunked4bit, ChunkedInt8, QuantSpec, packed_4bit_shape, quant_spec, rows_per_chunk

# Reads are this big (checkpoint bytes); the host-side transient of a load is a small multiple of it. On the CPU,
# bitsandbytes' quantization kernels allocate ~2.6x their input in temporaries, so chunks are smaller there.
DEFAULT_CHUNK_BYTES = 32 << 20
CPU_CHUNK_BYTES = 8 << 20

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

# place(name, module, param_name, value, quant_state) -> tensor this rank keeps (plain or DTensor), or None when the
# callback installed it itself. `value` is the full tensor in its final form on the load device.
PlaceFn = Callable[[str, nn.Module, str, torch.Tensor, object], Optional[torch.Tensor]]


# ------------------------------------------------------------------------------------------------ checkpoint files

@dataclass
class CheckpointEntry:
    """One tensor of a safetensors checkpoint: where it is, its dtype and shape; read() copies rows out of the file."""

    key: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset in its file's data section (entries are read in file order)
    nbytes: int

    def read(self, start: Optional[int] = None, stop: Optional[int] = None, device=None, dtype=None) -> torch.Tensor:
        """Rows [start:stop] (all when None) as a fresh tensor on `device` in `dtype`.

        safetensors maps the file and returns views of the mapping; the mapping (and every page of it that was touched)
        stays resident while any view lives. Opening the file per read and copying out keeps the host's file-backed
        footprint to one chunk."""
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            if start is None or len(self.shape) == 0:
                view = f.get_tensor(self.key)
            else:
                view = f.get_slice(self.key)[start:stop]
            out = view.to(device=device or "cpu", dtype=dtype or view.dtype, copy=True)
            del view
        return out


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ValueError("header too large")
            return json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e}); re-download the checkpoint") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files from_pretrained would read: the index's shards, or model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{index} is unreadable ({e}); re-download the checkpoint") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{model_dir} is missing checkpoint shard(s) {', '.join(missing[:3])} named in "
                             f"{index.name}; finish the download")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise ModelError(f"{model_dir} has only PyTorch .bin weights; streamed loading reads safetensors. Convert once "
                         "(load with transformers and save_pretrained(safe_serialization=True)) or use "
                         "parallel.strategy=none")
    raise ModelError(f"{model_dir} has no model.safetensors or model.safetensors.index.json; pass a Hugging Face "
                     "model directory with safetensors weights")


def list_checkpoint(model_dir: Path) -> list[CheckpointEntry]:
    """Every tensor of the checkpoint, from the file headers only (nothing is read), in file order."""
    entries = []
    for path in checkpoint_files(model_dir):
        for key, meta in _read_header(path).items():
            if key == "__metadata__":
                continue
            dt = SAFE_DTYPES.get(meta.get("dtype"))
            if dt is None:
                raise ModelError(f"{path.name}: tensor {key} has dtype {meta.get('dtype')}, which shardtune cannot "
                                 "load; use a bf16/fp16/fp32 checkpoint")
            b, e = meta["data_offsets"]
            entries.append(CheckpointEntry(key, path, dt, tuple(meta["shape"]), b, e - b))
    entries.sort(key=lambda t: (str(t.path), t.offset))
    return entries


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) one at a time, in file order, each a fresh CPU copy (the file mapping is released
    before the next). Keys are the checkpoint's own; see `CheckpointNames` for the model's names."""
    for e in list_checkpoint(model_dir):
        yield e.key, e.read()


class RandomEntry:
    """A stand-in checkpoint tensor with random values, generated on demand (per row chunk, on the load device): lets
    benchmarks build a 70B-shaped model directly in 4-bit without a checkpoint on disk. Norm weights are ones,
    biases zeros, everything else N(0, std); values are reproducible per (seed, key, rows)."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, std: float = 0.02):
        self.key, self.shape, self.dtype, self.seed, self.std = key, tuple(shape), dtype, seed, std
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()

    def read(self, start: Optional[int] = None, stop: Optional[int] = None, device=None, dtype=None) -> torch.Tensor:
        device = torch.device(device or "cpu")
        start = 0 if start is None or not self.shape else start
        stop = (self.shape[0] if self.shape else 0) if stop is None else stop
        shape = ((stop - start,) + self.shape[1:]) if self.shape else ()
        leaf = self.key.rsplit(".", 2)
        if len(self.shape) == 1 and "norm" in self.key:
            out = torch.ones(shape, device=device)
        elif leaf[-1] == "bias":
            out = torch.zeros(shape, device=device)
        else:
            g = torch.Generator(device=device)
            g.manual_seed((self.seed * 1_000_003 + sum(map(ord, self.key)) * 7919 + start) % (2**63))
            out = torch.randn(shape, generator=g, device=device).mul_(self.std)
        return out.to(dtype or self.dtype)


def random_entries(model: nn.Module, dtype: torch.dtype, seed: int = 0, std: float = 0.02) -> list[RandomEntry]:
    """RandomEntry for every weight a checkpoint of `model` (a fresh skeleton, before LoRA) would hold: persistent
    state-dict names, tied weights once, quantized linears in their unquantized [out, in] shape."""
    import bitsandbytes as bnb
    seen: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        for a, t in list(module._parameters.items()) + [(b, module._buffers[b]) for b in module._buffers
                                                         if b not in module._non_persistent_buffers_set]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            shape = tuple(t.shape)
            if a == "weight" and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                shape = (module.out_features, module.in_features)
            out.append(RandomEntry(f"{mname}.{a}" if mname else a, shape, dtype, seed, std))
    return out


# ------------------------------------------------------------------------------------------------ skeleton

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


# ------------------------------------------------------------------------------------------------ names

def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weight_renamings(base: nn.Module):
    """transformers' checkpoint-key renamings for this model, and its converters (which streaming cannot apply).
    Older transformers without this machinery, or with another interface, rename nothing (checkpoint keys are the
    module names, as for llama / mistral / qwen2)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        mapping = get_model_conversion_mapping(base)
    except (ImportError, TypeError, AttributeError):
        return [], []
    ren = [m for m in mapping if isinstance(m, WeightRenaming) and hasattr(m, "rename_source_key")]
    conv = [m for m in mapping if isinstance(m, WeightConverter) and hasattr(m, "rename_source_key")]
    return ren, conv


@dataclass
class Target:
    """One parameter (or buffer) object of the model that a checkpoint tensor fills, and every module holding it."""

    name: str
    holders: list[tuple[nn.Module, str]]
    kind: str  # "4bit" | "int8" | "plain"
    is_buffer: bool = False
    transpose: bool = False  # GPT-2 Conv1D weights are stored [in, out]

    @property
    def module(self) -> nn.Module:
        return self.holders[0][0]

    @property
    def attr(self) -> str:
        return self.holders[0][1]

    @property
    def current(self) -> torch.Tensor:
        m, a = self.holders[0]
        return m._buffers[a] if self.is_buffer else m._parameters[a]


class CheckpointNames:
    """Maps checkpoint keys to the model's parameters: transformers' renamings, base_model_prefix added or stripped,
    peft wrappers (LoRA base_layer, modules_to_save) looked through, tied weights filled once."""

    def __init__(self, model: nn.Module):
        import bitsandbytes as bnb
        self.base = _unwrap(model)
        self.prefix = getattr(self.base, "base_model_prefix", "") or ""
        self.renamings, self.converters = _weight_renamings(self.base)
        self._holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
        self._objects: dict[int, torch.Tensor] = {}  # keeps the original tensors alive so their ids stay unique
        for mname, module in self.base.named_modules(remove_duplicate=False):
            for store, is_buf in ((module._parameters, False), (module._buffers, True)):
                for a, t in store.items():
                    if t is None:
                        continue
                    full = f"{mname}.{a}" if mname else a
                    self._holders.setdefault(id(t), []).append((module, a, full))
                    self._objects[id(t)] = t
        self._bnb4, self._bnb8 = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
        self.filled: set[int] = set()
        # peft ModulesToSaveWrapper: its trainable copies start as the original's weights. For a tied head the
        # original shares the embedding's tensor, so the copies must be filled from the embedding's key too.
        self._mts = [m for m in self.base.modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")]

    def _module(self, path: str) -> Optional[nn.Module]:
        try:
            return self.base.get_submodule(path) if path else self.base
        except AttributeError:
            return None

    def _candidates(self, key: str) -> list[str]:
        for r in self.renamings:
            key, _ = r.rename_source_key(key)
        for c in self.converters:
            if c.rename_source_key(key)[1] is not None:
                raise ModelError(f"checkpoint tensor '{key}' needs a weight conversion ({type(c).__name__}) that "
                                 f"streamed loading does not apply for model type "
                                 f"'{getattr(self.base.config, 'model_type', '?')}'; use parallel.strategy=none or ddp "
                                 "(from_pretrained) for this architecture")
        out = [key]
        p = self.prefix
        if p:
            out += [key[len(p) + 1:]] if key.startswith(p + ".") else [f"{p}.{key}"]
        return out

    def _resolve_one(self, name: str) -> list[tuple[nn.Module, str, bool, str]]:
        path, _, attr = name.rpartition(".")
        module = self._module(path)
        if module is None:
            return []
        mods = [module]
        while hasattr(mods[0], "base_layer") and not isinstance(mods[0], (self._bnb4, self._bnb8)):
            mods = [mods[0].base_layer]  # peft LoRA wrapper
        if hasattr(mods[0], "original_module") and hasattr(mods[0], "modules_to_save"):  # peft ModulesToSaveWrapper
            mods = [mods[0].original_module] + list(mods[0].modules_to_save.values())
        found = []
        for m in mods:
            if m._parameters.get(attr) is not None:
                found.append((m, attr, False, name))
            elif m._buffers.get(attr) is not None:
                found.append((m, attr, True, name))
        return found

    def targets(self, key: str) -> list[Target]:
        """The parameters `key` fills (empty when the model has no such weight, or it was already filled: tied)."""
        for cand in self._candidates(key):
            found = self._resolve_one(cand)
            if found:
                break
        else:
            return []
        out: list[Target] = []
        for m, attr, is_buf, name in found:
            t = m._buffers[attr] if is_buf else m._parameters[attr]
            if id(t) in self.filled:
                continue
            self.filled.add(id(t))
            holders = [(m, attr)] + [(hm, ha) for hm, ha, _ in self._holders.get(id(t), [])
                                     if not (hm is m and ha == attr)]
            kind = "plain"
            if attr == "weight" and isinstance(m, self._bnb4):
                kind = "4bit"
            elif attr == "weight" and isinstance(m, self._bnb8):
                kind = "int8"
            conv1d = getattr(getattr(m, "source_cls", None), "__name__", "") == "Conv1D"
            out.append(Target(name, holders, kind, is_buf, transpose=kind != "plain" and conv1d))
            out += self._copies_of(holders, attr, is_buf)
        return out

    def _copies_of(self, holders, attr: str, is_buf: bool) -> list[Target]:
        """modules_to_save copies of any holder that is a wrapper's original module, not filled yet."""
        extra = []
        for w in self._mts:
            if not any(hm is w.original_module for hm, _ in holders):
                continue
            for copy in w.modules_to_save.values():
                t = copy._buffers.get(attr) if is_buf else copy._parameters.get(attr)
                if t is None or id(t) in self.filled:
                    continue
                self.filled.add(id(t))
                full = self._holders.get(id(t), [(None, None, attr)])[0][2]
                extra.append(Target(full, [(copy, attr)], "plain", is_buf))
        return extra

    def unfilled(self) -> list[str]:
        """Names of parameters / persistent buffers still on the meta device (missing from the checkpoint)."""
        names = []
        for tid, hs in self._holders.items():
            m, a, full = hs[0]
            t = m._parameters.get(a) if a in m._parameters else m._buffers.get(a)
            if t is not None and _is_meta(t) and tid not in self.filled:
                names.append(full)
        return names


def _is_meta(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).is_meta


# ------------------------------------------------------------------------------------------------ report

@dataclass
class LoadReport:
    """What loading cost on one rank: bytes read from the checkpoint, time, host and device memory peaks, and the
    bytes of weights (+ quantization constants) the rank keeps."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    tensors: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    rss_start_bytes: int = 0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: Optional[int] = None
    kept_bytes: int = 0
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def rss_growth_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.rss_start_bytes)

    def format(self) -> str:
        gb = 1e9
        mbps = self.bytes_read / max(self.seconds, 1e-9) / 1e6
        gpu = f", GPU peak {self.peak_gpu_bytes / gb:.2f} GB" if self.peak_gpu_bytes is not None else ""
        return (f"load rank {self.rank}/{self.world_size}: {self.tensors} tensors, {self.bytes_read / gb:.2f} GB read "
                f"in {self.seconds:.1f} s ({mbps:.0f} MB/s), peak CPU RSS {self.peak_rss_bytes / gb:.2f} GB "
                f"(+{self.rss_growth_bytes / gb:.2f} GB){gpu}, kept {self.kept_bytes / gb:.3f} GB on {self.device}")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rss_growth_bytes"] = self.rss_growth_bytes
        d["skipped_keys"] = list(self.skipped_keys)[:20]
        return d


def gather_load_reports(report: LoadReport) -> list[LoadReport]:
    """Every rank's report (collective when torch.distributed is initialised; call it on all ranks)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [report]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, report.to_dict())
    reps = []
    for d in out:
        d = dict(d)
        d.pop("rss_growth_bytes", None)
        reps.append(LoadReport(**d))
    return reps


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); then VmHWM is the exact peak since now."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryMonitor:
    """Peak host RSS from `start()` to `stop()` (or over a `with` block): the kernel's exact high-water mark when it
    can be reset, and psutil sampled every `interval_s` on a thread; peak device memory from the CUDA allocator.
    The streamed loader reports with it, and the load benchmark and memory tests measure with it."""

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.peak = 0
        self.peak_gpu = None
        self._stop = threading.Event()

    def start(self) -> "MemoryMonitor":
        self.baseline = _rss()
        self.hwm_ok = _reset_hwm()
        self.peak = self.baseline
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self):
        r = _rss()
        if r > self.peak:
            self.peak = r

    def stop(self) -> int:
        """Ends the sampling; returns the peak RSS in bytes."""
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.hwm_ok:
            self.peak = max(self.peak, _hwm())
        self.peak_gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return self.peak

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


# ------------------------------------------------------------------------------------------------ materialize

def _convert(entry, tgt: Target, spec: QuantSpec, device: torch.device, dtype: torch.dtype,
             chunk_bytes: int, monitor: MemoryMonitor):
    """Read `entry` chunk by chunk into its final form on `device`: (value, quant_state-or-None)."""
    cur = tgt.current
    shape = tuple(entry.shape)
    if tgt.kind == "plain":
        expected = tuple(cur.shape)
    else:
        lin = tgt.module
        expected = (lin.in_features, lin.out_features) if tgt.transpose else (lin.out_features, lin.in_features)
    if shape != expected:
        raise ModelError(f"checkpoint tensor {entry.key} has shape {list(shape)} but the model expects "
                         f"{list(expected)}; is config.json from the same model as the weights?")

    if tgt.transpose or len(shape) < 2:  # small or oddly laid out: read whole
        whole = entry.read(device=device, dtype=dtype if tgt.kind != "plain" else cur.dtype)
        if tgt.transpose:
            whole = whole.t().contiguous()
        chunks: Iterator[torch.Tensor] = iter([whole])
        del whole
    else:
        elem = max(1, entry.nbytes // max(1, math.prod(shape)))
        rows = rows_per_chunk(shape, elem, chunk_bytes, align_values=64 if tgt.kind == "4bit" else 1)
        load_dtype = dtype if tgt.kind != "plain" else cur.dtype

        def gen():
            for s in range(0, shape[0], rows):
                yield entry.read(s, min(shape[0], s + rows), device=device, dtype=load_dtype)
        chunks = gen()

    if tgt.kind == "4bit":
        acc = Chunked4bit((shape[1], shape[0]) if tgt.transpose else shape, spec, device)
    elif tgt.kind == "int8":
        acc = ChunkedInt8((shape[1], shape[0]) if tgt.transpose else shape, device)
    else:
        acc = None
        out = torch.empty(shape, dtype=cur.dtype, device=device)
        row = 0
    for c in chunks:
        monitor.sample()
        if acc is not None:
            acc.add(c)
        elif len(shape) == 0 or c.shape == out.shape:
            out.copy_(c)
        else:
            out[row:row + c.shape[0]].copy_(c)
            row += c.shape[0]
        del c
    if acc is not None:
        return acc.finish()
    return out, None


def _nbytes(t) -> int:
    if t is None:
        return 0
    if isinstance(t, torch.Tensor):
        local = getattr(t, "_local_tensor", None)
        t = local if local is not None else t
        return t.numel() * t.element_size()
    total = 0  # bitsandbytes QuantState
    for a in ("absmax", "code", "offset"):
        total += _nbytes(getattr(t, a, None))
    st2 = getattr(t, "state2", None)
    if st2 is not None:
        total += _nbytes(st2)
    return total


def _is_blob_layer(module: nn.Module) -> bool:
    """shardtune.parallel.quant4.ShardedLinear4bit: packed weight and its constants ('quant_blob') are both plain,
    shardable parameters, and the layer keeps no QuantState of its own."""
    return hasattr(module, "layout") and "quant_blob" in module._parameters


def _install(tgt: Target, kept: torch.Tensor, qs, spec: QuantSpec) -> None:
    """Put `kept` (full tensor or this rank's shard) into every module that holds the target."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor
    cur = tgt.current
    if tgt.is_buffer:
        for m, a in tgt.holders:
            m._buffers[a] = kept
        return
    if tgt.kind == "4bit" and _is_blob_layer(tgt.module):
        new = nn.Parameter(kept, requires_grad=False)
    elif tgt.kind == "4bit":
        tgt.module.quant_state = qs  # Linear4bit.forward recovers it from here once FSDP has replaced the Params4bit
        if isinstance(kept, DTensor):
            new = nn.Parameter(kept, requires_grad=False)
        else:
            new = bnb.nn.Params4bit(kept, requires_grad=False, quant_state=qs, blocksize=64,
                                    compress_statistics=spec.double_quant, quant_type=spec.kind,
                                    quant_storage=spec.storage, module=tgt.module, bnb_quantized=True)
    elif tgt.kind == "int8":
        if isinstance(kept, DTensor):
            raise ModelError("train.method=int8 cannot be sharded (bitsandbytes LLM.int8 keeps per-row state); use "
                             "train.method=qlora with fsdp/deepspeed, or int8 with parallel.strategy=none/ddp")
        new = bnb.nn.Int8Params(kept, requires_grad=False, has_fp16_weights=False, CB=kept, SCB=qs)
    else:
        new = nn.Parameter(kept, requires_grad=cur.requires_grad)
    new._is_hf_initialized = True
    for m, a in tgt.holders:
        m._parameters[a] = new


def _init_buffers(base: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints and meta init leaves them empty: allocate them
    on `device` and let the model's own _init_weights compute them, as from_pretrained does. Buffers start as NaN so
    a transformers version whose _init_weights does not cover them is caught; then the module is rebuilt from the
    config on the CPU and its freshly computed buffers are copied."""
    for name, module in base.named_modules():
        metas = [a for a, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        where = ", ".join(f"{name}.{a}" for a in metas)
        if any(p is not None for p in module._parameters.values()):
            raise ModelError(f"buffer(s) {where} are neither in the checkpoint nor computable; this architecture "
                             "cannot be streamed, use parallel.strategy=none")
        for a in metas:
            b = module._buffers[a]
            module._buffers[a] = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device) \
                if b.dtype.is_floating_point else torch.zeros(b.shape, dtype=b.dtype, device=device)
        if hasattr(base, "_init_weights"):
            with torch.no_grad():
                base._init_weights(module)
        if all(not module._buffers[a].dtype.is_floating_point or not module._buffers[a].isnan().any() for a in metas):
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=getattr(module, "config", None) or base.config)
        except Exception as e:  # the constructor takes something else: say so rather than train on garbage
            raise ModelError(f"buffer(s) {where} could not be initialised ({type(e).__name__}); this architecture "
                             "cannot be streamed, use parallel.strategy=none") from None
        for a in metas:
            module._buffers[a] = fresh._buffers[a].to(device=device, dtype=module._buffers[a].dtype)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def materialize(model: nn.Module, model_dir: Path, cfg, device: torch.device, dtype: torch.dtype,
                place: Optional[PlaceFn] = None, chunk_bytes: Optional[int] = None,
                entries: Optional[list] = None) -> LoadReport:
    """Fill a meta skeleton (plain, LoRA-wrapped and/or FSDP-sharded) from the checkpoint, tensor by tensor.

    Each tensor is read in chunks of ~chunk_bytes, cast to the compute dtype (quantized layers) or the parameter's
    dtype, moved to `device`, quantized there for Linear4bit / Linear8bitLt weights, given to `place` (default: keep
    it whole) and installed on every module that holds it; then it is freed before the next one. `entries` replaces
    the checkpoint as the source of tensors (random_entries for benchmarks)."""
    device = torch.device(device)
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if device.type == "cpu" else DEFAULT_CHUNK_BYTES
    spec = quant_spec(cfg, dtype)
    names = CheckpointNames(model)
    rank, world = _dist_rank_world()
    report = LoadReport(rank=rank, world_size=world, device=str(device))
    t0 = time.perf_counter()
    with MemoryMonitor(device) as mon:
        for entry in (entries if entries is not None else list_checkpoint(model_dir)):
            targets = names.targets(entry.key)
            if not targets:
                report.skipped_keys.append(entry.key)
                continue
            first = targets[0]
            value, qs = _convert(entry, first, spec, device, dtype, chunk_bytes, mon)
            report.tensors += 1
            report.bytes_read += entry.nbytes
            for tgt in targets:
                v = value if tgt is first else value.to(tgt.current.dtype, copy=True)
                kept = place(tgt.name, tgt.module, tgt.attr, v, qs) if place is not None else v
                if kept is not None:
                    _install(tgt, kept, qs, spec)
                    report.kept_bytes += _nbytes(kept)
                del v, kept
            if first.kind == "4bit" and _is_blob_layer(first.module):
                # the engine's shardable layer keeps its constants as a parameter: place them like any other
                m = first.module
                blob_t = Target(f"{first.name.rpartition('.')[0]}.quant_blob", [(m, "quant_blob")], "plain")
                names.filled.add(id(m._parameters["quant_blob"]))
                blob = m.layout.pack(qs)
                kept = place(blob_t.name, m, "quant_blob", blob, None) if place is not None else blob
                if kept is not None:
                    _install(blob_t, kept, None, spec)
                    report.kept_bytes += _nbytes(kept)
                del blob, kept
            else:
                report.kept_bytes += _nbytes(qs)
            del value, qs
            mon.sample()
        _init_buffers(names.base, device)
    missing = names.unfilled()
    if missing:
        raise ModelError(f"checkpoint in {model_dir} lacks {len(missing)} weight(s) the model needs (e.g. "
                         f"{', '.join(missing[:3])}); is config.json from the same model as the weights?")
    report.seconds = time.perf_counter() - t0
    report.rss_start_bytes = mon.baseline
    report.peak_rss_bytes = mon.peak
    report.peak_gpu_bytes = mon.peak_gpu
    return report


# ------------------------------------------------------------------------------------------------ placement

def local_chunk(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's piece of `full` under DTensor placements (Shard(d) = torch.chunk along d, ranks past the last
    chunk get an empty piece, as distribute_tensor and FSDP2 do), copied so `full` can be freed."""
    from torch.distributed.tensor import Replicate, Shard
    coord = mesh.get_coordinate()
    out = full
    for i, pl in enumerate(placements):
        if isinstance(pl, Shard) and type(pl) is Shard:
            pieces = torch.chunk(out, mesh.size(i), dim=pl.dim)
            out = pieces[coord[i]] if coord[i] < len(pieces) else out.narrow(pl.dim, out.size(pl.dim), 0)
        elif not isinstance(pl, Replicate):
            raise ModelError(f"streamed loading cannot place a parameter with placement {pl}; shard with Shard(dim) "
                             "or Replicate")
    return out.clone(memory_format=torch.contiguous_format)


def fsdp_place(device: Optional[torch.device] = None) -> PlaceFn:
    """A place callback for a model already wrapped with FSDP2 `fully_shard` on the meta device: keeps this rank's
    Shard(0) chunk (of the packed 4-bit storage for quantized weights) as a DTensor on `device` (the CPU when FSDP
    offloads parameters). Non-DTensor parameters (not managed by FSDP) are kept whole. FSDP2 re-pads the new local
    tensors in its lazy init (FSDPParam.reset_sharded_param)."""
    from torch.distributed.tensor import DTensor

    def place(name, module, param_name, value, quant_state):
        cur = module._parameters.get(param_name)
        if not isinstance(cur, DTensor):
            return value if device is None else value.to(device)
        local = local_chunk(value, cur.device_mesh, cur.placements)
        if device is not None:
            local = local.to(device)
        return _dtensor_like(cur, local)

    place.device = device  # build_streamed_model moves what was not streamed (LoRA weights) to the same device
    return place


def _dtensor_like(cur, local: torch.Tensor):
    """A DTensor with `cur`'s mesh, placements and global shape around `local`, on `local`'s device.
    DTensor.from_local would move a CPU shard back to a CUDA mesh's device, which breaks FSDP CPU offload."""
    from torch.distributed.tensor import DTensor
    if local.device.type == cur.device_mesh.device_type or local.is_meta:
        return DTensor.from_local(local, cur.device_mesh, cur.placements, run_check=False, shape=cur.shape,
                                  stride=cur.stride())
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    spec = DTensorSpec(cur.device_mesh, tuple(cur.placements),
                       tensor_meta=TensorMeta(cur.shape, cur.stride(), local.dtype))
    return DTensor(local, spec, requires_grad=False)


def _rehome_params(model: nn.Module, device: torch.device) -> int:
    """Move every parameter not on `device` there (the LoRA weights, created on the compute device before the
    weights were streamed in, when FSDP offloads parameters to the CPU). Before FSDP2's lazy init this is safe:
    it re-reads each parameter's local tensor then. Returns how many were moved."""
    from torch.distributed.tensor import DTensor
    moved = 0
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            local = p.to_local() if isinstance(p, DTensor) else p.data
            if local.device == device or local.device.type == "meta":
                continue
            if isinstance(p, DTensor):
                new = _dtensor_like(p, local.to(device))
            else:
                new = local.to(device)
            mod._parameters[pname] = nn.Parameter(new, requires_grad=p.requires_grad)
            moved += 1
    return moved


# ------------------------------------------------------------------------------------------------ one call

def build_streamed_model(cfg, model_dir: Path, device: torch.device, dtype: torch.dtype,
                         place: Optional[PlaceFn] = None, shard: Optional[Callable[[nn.Module], object]] = None,
                         chunk_bytes: Optional[int] = None, random_init: bool = False) -> nn.Module:
    """The model build_model returns (same types, names, dtypes, bit-exact 4-bit data, same LoRA init for the same
    seed), built without ever holding the whole checkpoint: skeleton -> LoRA on the skeleton -> `shard(model)` (a
    sharding engine's wrapper, optional) -> stream the weights in through `place`. The LoadReport is attached as
    `model.load_report`. random_init=True needs only config.json: weights are random (RandomEntry), generated and
    quantized chunk by chunk on `device` (benchmarks of shapes whose checkpoint would not fit on disk)."""
    from shardtune.model.load import enable_checkpointing
    device = torch.device(device)
    model = build_skeleton(cfg, model_dir, dtype)
    entries = None
    if random_init:
        load_dtype = torch.float32 if cfg.train.method == "full" else dtype
        entries = random_entries(model, load_dtype, seed=cfg.train.seed)
    if cfg.train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora_to_skeleton(model, cfg, device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    if shard is not None:
        wrapped = shard(model)
        model = wrapped if wrapped is not None else model
    report = materialize(model, model_dir, cfg, device, dtype, place=place, chunk_bytes=chunk_bytes, entries=entries)
    home = getattr(place, "device", None)
    if home is not None and torch.device(home) != device:
        _rehome_params(model, torch.device(home))
    model.load_report = report
    return model
