"""Quantize a weight that arrives in row chunks, with results bit-identical to quantizing the whole tensor at once.

Streaming loads read a weight a few MiB at a time, so the host never holds a whole (possibly GB-sized) tensor plus the
2-3x temporaries that bitsandbytes' CPU kernels allocate. 4-bit quantization is blockwise over the flattened tensor
(blocks of 64 values, each with its own absmax), so chunks that start on a block boundary quantize independently; only
double quantization (absmax quantized again, offset = mean over *all* blocks) needs the whole absmax vector, and it is
done once at the end exactly as `bitsandbytes.functional.quantize_4bit` does it. LLM.int8 is row-wise, so row chunks
are independent too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit weights, and what transformers' from_pretrained uses
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the double-quantized absmax


@dataclass(frozen=True)
class QuantSpec:
    """How linear weights are stored on load: 'nf4' / 'fp4' (4-bit, QLoRA), 'int8' (LLM.int8) or None (not
    quantized)."""

    kind: Optional[str]
    double_quant: bool = True
    storage: torch.dtype = torch.uint8  # 4-bit packed storage dtype (= compute dtype, so FSDP/ZeRO-3 can shard it)
    compute_dtype: torch.dtype = torch.float32
    int8_threshold: float = 6.0

    @property
    def is_4bit(self) -> bool:
        return self.kind in ("nf4", "fp4")

    @property
    def is_int8(self) -> bool:
        return self.kind == "int8"


def quant_spec(cfg, dtype: torch.dtype) -> QuantSpec:
    """The QuantSpec of a run config; mirrors shardtune.model.load.quantization_config."""
    m = cfg.train.method
    if m == "qlora":
        return QuantSpec(cfg.quant.quant_type, cfg.quant.double_quant, dtype, dtype)
    if m == "int8":
        return QuantSpec("int8", compute_dtype=dtype)
    return QuantSpec(None, compute_dtype=dtype)


def packed_4bit_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """Shape of the packed 4-bit data of a tensor with `numel` values: 2 values per byte, viewed as `storage`."""
    itemsize = torch.empty((), dtype=storage).element_size()
    return ((numel + 1) // (2 * itemsize), 1)


def rows_per_chunk(shape: tuple[int, ...], element_bytes: int, chunk_bytes: int, align_values: int = 1) -> int:
    """Rows per read so a chunk is about `chunk_bytes`, and every chunk starts `align_values`-aligned in the
    flattened tensor (4-bit blocks must not straddle two chunks)."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = align_values // math.gcd(row, align_values) if align_values > 1 else 1
    rows = max(1, chunk_bytes // max(1, row * element_bytes))
    return max(step, rows // step * step)


class Chunked4bit:
    """Accumulates `bitsandbytes.functional.quantize_4bit` over consecutive row chunks of a 2-D weight.

    add(chunk) takes the next rows (already in the compute dtype, on the quantization device); finish() returns
    (packed, QuantState) equal bit for bit to quantize_4bit(whole, blocksize=64, compress_statistics=double_quant,
    quant_type=kind, quant_storage=storage).
    """

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec, device: torch.device):
        import bitsandbytes.functional as F  # noqa: F401 - fail early if missing
        self.shape = torch.Size(shape)
        self.spec = spec
        self.device = device
        n = self.shape.numel()
        self.packed = torch.empty(packed_4bit_shape(n, spec.storage), dtype=spec.storage, device=device)
        self.absmax = torch.empty((-(n // -BLOCKSIZE),), dtype=torch.float32, device=device)
        self._values = 0  # values quantized so far
        self._dtype: Optional[torch.dtype] = None

    def add(self, chunk: torch.Tensor) -> None:
        import bitsandbytes.functional as F
        if self._values % BLOCKSIZE:
            raise ValueError("a 4-bit chunk must start on a 64-value block boundary")
        self._dtype = chunk.dtype
        q, st = F.quantize_4bit(chunk.contiguous(), blocksize=BLOCKSIZE, compress_statistics=False,
                                quant_type=self.spec.kind, quant_storage=self.spec.storage)
        p0 = packed_4bit_shape(self._values, self.spec.storage)[0]
        b0 = self._values // BLOCKSIZE
        self.packed[p0:p0 + q.shape[0]].copy_(q)
        self.absmax[b0:b0 + st.absmax.numel()].copy_(st.absmax)
        self._values += chunk.numel()

    def finish(self):
        import bitsandbytes.functional as F
        from bitsandbytes.functional import QuantState
        if self._values != self.shape.numel():
            raise ValueError(f"quantized {self._values} of {self.shape.numel()} values")
        code = F.get_4bit_type(self.spec.kind, device=self.device)
        if self.spec.double_quant:
            # The same second stage quantize_4bit runs: absmax centred on its mean, 8-bit blockwise with blocksize 256.
            offset = self.absmax.mean()
            qabsmax, state2 = F.quantize_blockwise(self.absmax - offset, blocksize=NESTED_BLOCKSIZE)
            state = QuantState(absmax=qabsmax, shape=self.shape, dtype=self._dtype, blocksize=BLOCKSIZE, code=code,
                               quant_type=self.spec.kind, offset=offset, state2=state2)
        else:
            state = QuantState(absmax=self.absmax, shape=self.shape, dtype=self._dtype, blocksize=BLOCKSIZE, code=code,
                               quant_type=self.spec.kind)
        packed, self.packed, self.absmax = self.packed, None, None
        return packed, state


class ChunkedInt8:
    """Row-wise LLM.int8 quantization over row chunks: (CB int8 [out, in], SCB fp32 [out]) as bitsandbytes'
    Int8Params does it (the weight goes through fp16 first)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.shape = torch.Size(shape)
        self.cb = torch.empty(self.shape, dtype=torch.int8, device=device)
        self.scb = torch.empty((self.shape[0],), dtype=torch.float32, device=device)
        self._rows = 0

    def add(self, chunk: torch.Tensor) -> None:
        import bitsandbytes.functional as F
        cb, scb, _ = F.int8_vectorwise_quant(chunk.to(torch.float16).contiguous())
        r = chunk.shape[0]
        self.cb[self._rows:self._rows + r].copy_(cb)
        self.scb[self._rows:self._rows + r].copy_(scb)
        self._rows += r

    def finish(self):
        if self._rows != self.shape[0]:
            raise ValueError(f"quantized {self._rows} of {self.shape[0]} rows")
        return self.cb, self.scb
