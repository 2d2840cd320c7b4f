"""A bitsandbytes 4-bit linear layer whose weights *and* quantization constants are plain parameters, so that FSDP2
and DeepSpeed ZeRO-3 can shard all of them.

Why: `fully_shard` replaces every parameter with a DTensor-backed `nn.Parameter`, which drops the `Params4bit` subclass
and the `quant_state` hanging off it; the stock `Linear4bit.forward` then cannot dequantize. ZeRO-3 keeps the Parameter
objects, but the constants in `quant_state` (absmax per 64-value block, ~3% of the packed bytes with double quant) stay
replicated on every rank. `ShardedLinear4bit` keeps the packed 4-bit data in `weight` (dtype = quant storage dtype,
shape [(out*in+1)//(2*itemsize), 1], exactly bitsandbytes' layout) and packs the per-layer constants (absmax, nested
absmax, offset) as raw bytes into a second frozen parameter `quant_blob` of the same storage dtype. Only the fixed
lookup tables (16 + 256 floats) stay replicated. The forward rebuilds a `QuantState` from the gathered blob and calls
bitsandbytes' own kernels, so the numbers are those of the stock layer.

The class subclasses `bnb.nn.Linear4bit`, so peft still wraps it with its 4-bit LoRA layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

from shardtune.errors import ConfigError

NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for double-quantizing absmax


@dataclass(frozen=True)
class QuantLayout:
    """Where each quantization constant of one layer lives in its byte blob; computable without any data (meta)."""

    out_features: int
    in_features: int
    blocksize: int
    quant_type: str
    nested: bool
    weight_dtype: torch.dtype   # dtype dequantization produces (the model's dtype)
    storage_dtype: torch.dtype  # dtype of `weight` and `quant_blob`

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def n_nested_blocks(self) -> int:
        return math.ceil(self.n_blocks / NESTED_BLOCKSIZE) if self.nested else 0

    @property
    def packed_rows(self) -> int:
        """Rows of bitsandbytes' packed weight: two 4-bit values per byte, itemsize bytes per storage element."""
        mod = torch.tensor([], dtype=self.storage_dtype).element_size() * 2
        return (self.numel + 1) // mod

    @cached_property
    def _offsets(self) -> tuple[int, int, int, int]:
        """Byte offsets: absmax, nested absmax (4-aligned), offset scalar, total (padded to the storage itemsize)."""
        absmax_bytes = self.n_blocks * (1 if self.nested else 4)
        nested_at = -(-absmax_bytes // 4) * 4
        offset_at = nested_at + 4 * self.n_nested_blocks
        end = offset_at + (4 if self.nested else 0)
        item = torch.tensor([], dtype=self.storage_dtype).element_size()
        return 0, nested_at, offset_at, -(-end // item) * item

    @property
    def blob_numel(self) -> int:
        item = torch.tensor([], dtype=self.storage_dtype).element_size()
        return self._offsets[3] // item

    @property
    def blob_bytes(self) -> int:
        return self._offsets[3]

    def pack(self, qs) -> torch.Tensor:
        """The constants of `qs` (a bitsandbytes QuantState) as a 1-D tensor of storage dtype."""
        _, nested_at, offset_at, total = self._offsets
        out = torch.zeros(total, dtype=torch.uint8, device=qs.absmax.device)
        a = qs.absmax.detach().contiguous().view(-1)
        if self.nested:
            if a.dtype != torch.uint8 or qs.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError("unexpected double-quant layout from bitsandbytes")
            out[:a.numel()] = a
            s2 = qs.state2.absmax.detach().float().contiguous().view(-1)
            out[nested_at:nested_at + 4 * s2.numel()] = s2.view(torch.uint8)
            off = torch.as_tensor(qs.offset, dtype=torch.float32, device=out.device).reshape(1)
            out[offset_at:offset_at + 4] = off.view(torch.uint8)
        else:
            a = a.float()
            out[:4 * a.numel()] = a.view(torch.uint8)
        return out.view(self.storage_dtype)

    def unpack(self, blob: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor | None]):
        """A QuantState whose tensors are views into `blob` (the gathered parameter)."""
        b = blob.reshape(-1).view(torch.uint8)
        _, nested_at, offset_at, _ = self._offsets
        code, nested_code = codes
        shape = torch.Size([self.out_features, self.in_features])
        if self.nested:
            state2 = bnbF.QuantState(absmax=_f32(b, nested_at, self.n_nested_blocks), code=nested_code,
                                     blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            return bnbF.QuantState(absmax=b[:self.n_blocks], shape=shape, code=code, blocksize=self.blocksize,
                                   quant_type=self.quant_type, dtype=self.weight_dtype,
                                   offset=_f32(b, offset_at, 1)[0], state2=state2)
        return bnbF.QuantState(absmax=_f32(b, 0, self.n_blocks), shape=shape, code=code,
                               blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype)

    def dequantize(self, packed: torch.Tensor, blob: torch.Tensor,
                   codes: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """The [out, in] weight in `weight_dtype`: the same bitsandbytes kernels (and so the same numbers) as
        `bnbF.dequantize_4bit(packed, self.unpack(blob, codes))`, called directly. This runs three times per layer
        and step (forward, recomputation, backward); building QuantState objects each time cost more host time than
        the kernels take on the GPU, and a sharded step is bound by host time (docs/benchmarks.md)."""
        b = blob.reshape(-1).view(torch.uint8)
        _, nested_at, offset_at, _ = self._offsets
        if self.nested:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                b[:self.n_blocks], _f32(b, nested_at, self.n_nested_blocks), codes[1], NESTED_BLOCKSIZE,
                torch.float32)
            absmax += _f32(b, offset_at, 1)
        else:
            absmax = _f32(b, 0, self.n_blocks)
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            packed.reshape(-1, 1), absmax, self.blocksize, self.quant_type, self.shape, self.weight_dtype)

    @cached_property
    def shape(self) -> torch.Size:
        return torch.Size([self.out_features, self.in_features])


def _f32(b: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """`n` float32 values at byte `start` of the uint8 tensor `b`; a view when 4-byte aligned (always for shardtune's
    own layouts), a copy otherwise (an engine may gather a 2-byte-storage blob at an odd element offset)."""
    piece = b[start:start + 4 * n]
    if piece.storage_offset() % 4:
        piece = piece.clone()
    return piece.view(torch.float32)


def canonical_codes(quant_type: str, nested: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed lookup tables bitsandbytes uses (4-bit code; 8-bit dynamic map for the nested absmax)."""
    code = bnbF.get_4bit_type(quant_type, device="cpu")
    return code, (bnbF.create_dynamic_map(signed=True) if nested else None)


class _Matmul4bit(torch.autograd.Function):
    """y = x @ dequant(W)^T, with W read from the module at backward time instead of saved.

    Saving W (as bitsandbytes' own MatMul4Bit does) would keep every layer's gathered weight alive from forward to
    backward under ZeRO-3, which frees parameters by swapping `param.data`; reading the module's parameter again in
    backward lets the engine re-gather it (FSDP2 and ZeRO-3 both do before a module's backward)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        # dequantize + linear is what bitsandbytes' gemm_4bit does for training-sized inputs; spelled out here because
        # matmul_4bit's reading of the weight's orientation differs across releases (older ones take weight.t())
        return torch.nn.functional.linear(x, module.dequantized(x.device).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.module.dequantized(grad_out.device).to(grad_out.dtype), None


class ShardedLinear4bit(bnb.nn.Linear4bit):
    """Linear4bit with `weight` (packed 4-bit data) and `quant_blob` (its constants) as plain frozen parameters.

    Build it with `make_shardable(model)`; never construct it directly."""

    layout: QuantLayout

    def _device_codes(self, device: torch.device):
        codes = self._codes.get(device)
        if codes is None:
            codes = tuple(c.to(device) if c is not None else None for c in self._codes["cpu"])
            self._codes[device] = codes
        return codes

    def _packed_and_blob(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, blob = self.weight, self.quant_blob
        w = w.to_local() if hasattr(w, "to_local") else w  # a DTensor only if called outside an FSDP2 forward
        blob = blob.to_local() if hasattr(blob, "to_local") else blob
        return w, blob

    def dequantized(self, device: torch.device) -> torch.Tensor:
        w, blob = self._packed_and_blob()
        return self.layout.dequantize(w, blob, self._device_codes(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        y = _Matmul4bit.apply(x, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(inp_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The full-precision weight (for checks and merging); needs the full, gathered parameters."""
        return self.dequantized(self.weight.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)


def _layout_of(m: bnb.nn.Linear4bit, storage_dtype: torch.dtype, weight_dtype: torch.dtype) -> QuantLayout:
    p = m.weight
    return QuantLayout(out_features=m.out_features, in_features=m.in_features, blocksize=getattr(p, "blocksize", 64),
                       quant_type=getattr(p, "quant_type", "nf4"), nested=bool(getattr(p, "compress_statistics", True)),
                       weight_dtype=weight_dtype, storage_dtype=storage_dtype)


def convert_linear4bit(m: bnb.nn.Linear4bit, weight_dtype: torch.dtype | None = None) -> ShardedLinear4bit:
    """Turn one Linear4bit (quantized, or still unquantized on the meta device) into a ShardedLinear4bit in place."""
    if isinstance(m, ShardedLinear4bit):
        return m
    p = m.weight
    qs = getattr(p, "quant_state", None) or getattr(m, "quant_state", None)
    storage = getattr(m, "quant_storage", None) or getattr(p, "quant_storage", torch.uint8)
    if p.device.type == "meta" and qs is None:
        wdt = weight_dtype or (m.compute_dtype if m.compute_dtype is not None else torch.float32)
        layout = _layout_of(m, storage, wdt)
        packed = torch.empty(layout.packed_rows, 1, dtype=storage, device="meta")
        blob = torch.empty(layout.blob_numel, dtype=storage, device="meta")
        codes = canonical_codes(layout.quant_type, layout.nested)
    else:
        if qs is None or not getattr(p, "bnb_quantized", True):
            raise ValueError(f"Linear4bit {m.in_features}x{m.out_features} is not quantized yet; move it to its "
                             "device first (bitsandbytes quantizes on .to(device))")
        if getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
            p.data, qs = _convert_weight_packed_for_cpu_inverse(p.data, qs)
        layout = QuantLayout(out_features=m.out_features, in_features=m.in_features, blocksize=qs.blocksize,
                             quant_type=qs.quant_type, nested=qs.nested, weight_dtype=qs.dtype,
                             storage_dtype=p.dtype)
        if tuple(p.shape) != (layout.packed_rows, 1):
            raise ValueError(f"unexpected packed 4-bit weight shape {tuple(p.shape)} (expected {layout.packed_rows}x1)")
        packed = p.data
        blob = layout.pack(qs)
        codes = (qs.code.detach().cpu().clone(),
                 qs.state2.code.detach().cpu().clone() if qs.nested else None)
    m.__class__ = ShardedLinear4bit
    m.layout = layout
    m._codes = {"cpu": codes}
    # plain Parameters: no Params4bit (its .to() would re-quantize or touch the dropped quant_state)
    m.weight = nn.Parameter(packed, requires_grad=False)
    m.quant_blob = nn.Parameter(blob, requires_grad=False)
    m.quant_state = None
    m.compute_type_is_set = True
    return m


def make_shardable(model: nn.Module, weight_dtype: torch.dtype | None = None) -> int:
    """Convert every bitsandbytes Linear4bit under `model` in place; returns how many were converted."""
    n = 0
    for m in list(model.modules()):
        if isinstance(m, bnb.nn.Linear4bit) and not isinstance(m, ShardedLinear4bit):
            convert_linear4bit(m, weight_dtype)
            n += 1
    return n


def check_quant_storage(model: nn.Module, cast_to: torch.dtype | None, engine: str) -> None:
    """Refuse a model whose packed 4-bit bytes an engine would cast. FSDP2 (mixed-precision param_dtype) and DeepSpeed
    (bf16/fp16 mode) cast floating-point parameters to the compute dtype; the packed bytes live in a tensor of the
    quant storage dtype, and a cast to another float dtype converts them as numbers and scrambles every weight.
    Integer (uint8) storage is never cast. `cast_to` None: the engine casts nothing."""
    if cast_to is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, ShardedLinear4bit):
            stored = m.layout.storage_dtype
        elif isinstance(m, bnb.nn.Linear4bit):
            stored = m.weight.dtype
        else:
            continue
        if stored.is_floating_point and stored != cast_to:
            raise ConfigError(f"4-bit weights of {name} are stored as {str(stored).replace('torch.', '')} but {engine} "
                              f"casts parameters to {str(cast_to).replace('torch.', '')} (train.precision), which "
                              "scrambles the packed bytes; load the model with bnb_4bit_quant_storage equal to the "
                              "compute dtype (shardtune's loader does) or use uint8 storage")


def quantize_into(m: ShardedLinear4bit, full_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a full-precision [out, in] weight with this layer's settings; returns (packed weight, blob), both full
    tensors, for loaders that fill the layer after sharding (copy each rank's slice with `copy_full_into`)."""
    lay = m.layout
    if tuple(full_weight.shape) != (lay.out_features, lay.in_features):
        raise ValueError(f"weight shape {tuple(full_weight.shape)} != {(lay.out_features, lay.in_features)}")
    packed, qs = bnbF.quantize_4bit(full_weight.to(lay.weight_dtype).contiguous(), blocksize=lay.blocksize,
                                   compress_statistics=lay.nested, quant_type=lay.quant_type,
                                   quant_storage=lay.storage_dtype)
    return packed, lay.pack(qs)


def quant4_bytes(model: nn.Module) -> tuple[int, int]:
    """(packed 4-bit weight bytes, quantization-constant bytes) that this rank holds locally."""
    from shardtune.parallel.balance import tensor_local_bytes
    w = c = 0
    for m in model.modules():
        if isinstance(m, ShardedLinear4bit):
            w += tensor_local_bytes(m.weight)
            c += tensor_local_bytes(m.quant_blob)
        elif isinstance(m, bnb.nn.Linear4bit):
            w += tensor_local_bytes(m.weight)
            qs = getattr(m.weight, "quant_state", None)
            if qs is not None:
                c += qs.absmax.numel() * qs.absmax.element_size()
                if qs.nested:
                    c += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + 4
    return w, c
