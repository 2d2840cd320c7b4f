"""Quantizing a weight chunk by chunk (as the streamed loader reads it) gives bit for bit what bitsandbytes gives for
the whole tensor: packed 4-bit data, absmax, double-quant constants, and LLM.int8 codes and scales."""

from __future__ import annotations

import pytest
import torch

bnbF = pytest.importorskip("bitsandbytes.functional")

from shardtune.model.quantize import (Chunked4bit, ChunkedInt8, QuantSpec, packed_4bit_shape,  # noqa: E402
                                      rows_per_chunk)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _feed(acc, w: torch.Tensor, rows: int):
    for s in range(0, w.shape[0], rows):
        acc.add(w[s:s + rows])
    return acc.finish()


@pytest.mark.parametrize("shape,kind,double,dtype", [
    ((176, 64), "nf4", True, torch.float32),      # tiny-model MLP shape
    ((64, 176), "nf4", False, torch.float32),     # row length not a multiple of 64
    ((300, 96), "fp4", True, torch.bfloat16),     # bf16 storage: 4 values per storage element
    ((257, 40), "nf4", True, torch.float16),      # odd rows, last block partial
    ((1000, 512), "nf4", True, torch.float32),    # > 256 blocks: nested quantization has several blocks
])
def test_chunked_4bit_equals_whole(shape, kind, double, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    spec = QuantSpec(kind, double, dtype, dtype)
    rows = rows_per_chunk(shape, w.element_size(), chunk_bytes=3000, align_values=64)
    assert rows * shape[1] % 64 == 0 and rows < shape[0]  # several chunks, each starting on a block boundary
    packed, qs = _feed(Chunked4bit(shape, spec, torch.device("cpu")), w, rows)
    ref, rqs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type=kind, quant_storage=dtype)
    assert packed.shape == ref.shape == packed_4bit_shape(w.numel(), dtype)
    assert torch.equal(_bits(packed), _bits(ref))
    assert torch.equal(_bits(qs.absmax), _bits(rqs.absmax))
    assert qs.shape == rqs.shape and qs.dtype == rqs.dtype and qs.blocksize == rqs.blocksize == 64
    if double:
        assert torch.equal(qs.offset, rqs.offset)
        assert torch.equal(qs.state2.absmax, rqs.state2.absmax)
        assert torch.equal(qs.state2.code, rqs.state2.code)
    if w.numel() // 64 <= 256:  # (more nested blocks send bitsandbytes' CPU dequantize through torch.compile: slow)
        assert torch.equal(bnbF.dequantize_4bit(packed, qs), bnbF.dequantize_4bit(ref, rqs))


def test_misaligned_chunk_is_refused():
    acc = Chunked4bit((10, 48), QuantSpec("nf4"), torch.device("cpu"))
    acc.add(torch.randn(1, 48))
    with pytest.raises(ValueError, match="block boundary"):
        acc.add(torch.randn(1, 48))


def test_chunked_int8_equals_whole():
    torch.manual_seed(0)
    w = torch.randn(70, 48)
    cb, scb = _feed(ChunkedInt8(w.shape, torch.device("cpu")), w, 16)
    rcb, rscb, _ = bnbF.int8_vectorwise_quant(w.half())
    assert torch.equal(cb, rcb) and torch.equal(scb, rscb)


def test_rows_per_chunk_respects_budget_and_alignment():
    assert rows_per_chunk((1000, 4096), 4, 8 << 20) == 512
    r = rows_per_chunk((1000, 176), 4, 10_000, align_values=64)
    assert r * 176 % 64 == 0 and r * 176 * 4 <= 10_000
    assert rows_per_chunk((5, 10), 4, 1, align_values=64) == 32  # never below one aligned step
