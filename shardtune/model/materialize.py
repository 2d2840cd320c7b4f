"""Fill a meta skeleton from a checkpoint tensor by tensor: read in chunks, cast, move to the device, quantize there,
keep what the `place` callback says this rank keeps, install it on every module holding it, free it.

How a sharding engine steers this (which part of a tensor a rank keeps, which layers keep their 4-bit constants as a
parameter, where unstreamed parameters go afterwards) is the `Placement` protocol below; engines implement it in
`shardtune.parallel`, so this module never imports them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from shardtune.errors import ModelError
from shardtune.model.checkpoint import list_checkpoint
from shardtune.model.checkpoint_names import CheckpointNames, Target
from shardtune.model.load_report import LoadReport
from shardtune.model.memory_monitor import MemoryMonitor
from shardtune.model.quantize import Chunked4bit, ChunkedInt8, QuantSpec, quant_spec, rows_per_chunk

# Reads are this big (checkpoint bytes); the host-side transient of a load is a small multiple of it. On the CPU,
# bitsandbytes' quantization kernels allocate ~2.6x their input in temporaries, so chunks are smaller there.
DEFAULT_CHUNK_BYTES = 32 << 20
CPU_CHUNK_BYTES = 8 << 20

# place(name, module, param_name, value, quant_state) -> tensor this rank keeps (plain or DTensor), or None when the
# callback installed it itself. `value` is the full tensor in its final form on the load device.
PlaceFn = Callable[[str, nn.Module, str, torch.Tensor, object], Optional[torch.Tensor]]
# (name of the parameter that holds a layer's 4-bit constants, function packing a bitsandbytes QuantState into it)
ConstantsParam = tuple[str, Callable[[object], torch.Tensor]]


class Placement:
    """A place callback that also answers the loader's two other questions. The base keeps every tensor whole where
    it was loaded; a sharding engine subclasses it (shardtune.parallel.placement.FsdpPlacement). A plain PlaceFn
    function is accepted wherever a Placement is, and then gets these defaults."""

    def __call__(self, name: str, module: nn.Module, param_name: str, value: torch.Tensor,
                 quant_state) -> Optional[torch.Tensor]:
        return value

    def constants_param(self, module: nn.Module) -> Optional[ConstantsParam]:
        """For a 4-bit layer that keeps its quantization constants as a parameter of its own (so an engine can shard
        them like the weight): that parameter's name and how to pack a QuantState into it. None: the constants stay a
        QuantState on the module, as bitsandbytes' Linear4bit keeps them."""
        return None

    def after_load(self, model: nn.Module, load_device: torch.device) -> None:
        """Called once every tensor is in (e.g. to move parameters that were not streamed next to the streamed
        ones)."""


_KEEP_WHOLE = Placement()


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


def _install(tgt: Target, kept: torch.Tensor, qs, spec: QuantSpec, constants_apart: bool = False) -> None:
    """Put `kept` (full tensor or this rank's shard) into every module that holds the target. `constants_apart`: the
    layer keeps its 4-bit constants in a parameter of its own, so the weight is a plain frozen parameter."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor
    cur = tgt.current
    if tgt.is_buffer:
        for m, a in tgt.holders:
            m._buffers[a] = kept
        return
    if tgt.kind == "4bit" and constants_apart:
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
    the checkpoint as the source of tensors (random_entries for benchmarks). A `Placement` is also asked which 4-bit
    layers keep their constants as a parameter, and gets `after_load` at the end."""
    device = torch.device(device)
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if device.type == "cpu" else DEFAULT_CHUNK_BYTES
    spec = quant_spec(cfg, dtype)
    hooks = place if isinstance(place, Placement) else _KEEP_WHOLE
    place = place if place is not None else _KEEP_WHOLE
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
            apart = hooks.constants_param(first.module) if first.kind == "4bit" else None
            for tgt in targets:
                v = value if tgt is first else value.to(tgt.current.dtype, copy=True)
                kept = place(tgt.name, tgt.module, tgt.attr, v, qs)
                if kept is not None:
                    _install(tgt, kept, qs, spec, constants_apart=apart is not None)
                    report.kept_bytes += _nbytes(kept)
                del v, kept
            if apart is not None:
                # the engine's shardable layer keeps its constants as a parameter: place them like any other
                m, (attr, pack) = first.module, apart
                blob_t = Target(f"{first.name.rpartition('.')[0]}.{attr}", [(m, attr)], "plain")
                names.filled.add(id(m._parameters[attr]))
                blob = pack(qs)
                kept = place(blob_t.name, m, attr, blob, None)
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
    hooks.after_load(model, device)
    return report
