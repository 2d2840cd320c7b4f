"""Attention of one decoder layer, forward + backward: causal (what an unpacked row runs) against packed rows (what
transformers runs when data.packing restarts positions per sample), on the GPU, same shapes.

    python bench/attn_mask_bench.py --shape llama3-8b --seq 2048 --micro 8 --out bench/results/attn_mask_h200.json

Causal: SDPA with is_causal and grouped K/V (enable_gqa), the flash path. Packed: transformers' sdpa path with a
block-diagonal bool mask [b, 1, s, s] built from the restarting position ids: K and V repeated to every query head
(repeat_kv: SDPA's GQA is not used with a mask) and SDPA with attn_mask, which cannot skip the masked-out upper
triangle. Timed with CUDA events over --iters iterations after warm-up, the repeat and the mask's use included.
The ratio packed / causal is what the planner's packed speed term uses (docs/planner.md, "Speed model").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHAPES  # noqa: E402


def block_causal_mask(b: int, s: int, lengths: list[int], device):
    """[b, 1, s, s] bool: position i attends to j when j <= i within the same packed sample."""
    import torch
    seg = []
    for i, n in enumerate(lengths):
        seg += [i] * n
    seg = torch.tensor((seg + [len(lengths)] * s)[:s], device=device)
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    return (same & causal)[None, None].expand(b, 1, s, s)


def time_fn(fn, iters: int, warmup: int = 3) -> float:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def main() -> None:
    import torch
    import torch.nn.functional as F
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    spec = SHAPES[args.shape]
    h, nq, nkv = spec["hidden_size"], spec["num_attention_heads"], spec["num_key_value_heads"]
    d, s, dev, dt = h // nq, args.seq, "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lengths = []                                   # Spider-like samples: 150-500 tokens, the last one cut
    while sum(lengths) < s:
        lengths.append(int(torch.randint(150, 500, (1,), generator=g)))
    rows = []
    for b in args.micro:
        q = torch.randn(b, nq, s, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, nkv, s, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(b, nkv, s, d, device=dev, dtype=dt, requires_grad=True)
        go = torch.randn(b, nq, s, d, device=dev, dtype=dt)
        mask = block_causal_mask(b, s, lengths, dev)

        def causal():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o.backward(go)

        def packed():
            kr = k[:, :, None].expand(b, nkv, nq // nkv, s, d).reshape(b, nq, s, d)
            vr = v[:, :, None].expand(b, nkv, nq // nkv, s, d).reshape(b, nq, s, d)
            o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
            o.backward(go)
        tc, tp = time_fn(causal, args.iters), time_fn(packed, args.iters)
        flops_causal = 3 * 2 * 2 * b * nq * s * s * d / 2       # fwd QK^T + AV (x2 for bwd's 4 -> 3 x fwd), half masked
        row = {"micro_batch": b, "causal_s": round(tc, 6), "packed_s": round(tp, 6), "ratio": round(tp / tc, 3),
               "causal_tflops": round(flops_causal / tc / 1e12, 1), "samples_per_row": len(lengths)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "seq": s, "gpu": torch.cuda.get_device_name(0),
                                              "torch": torch.__version__, "command": " ".join(sys.argv),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
