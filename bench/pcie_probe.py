"""Host<->device copy bandwidth as activation offloading uses it (issue 17): device-to-host copies of 256 MiB into
pinned buffers allocated per copy (torch's caching host allocator) and into one reused buffer, on a side stream.

    python bench/pcie_probe.py     # prints one JSON line
"""

from __future__ import annotations

import json
import time

import torch


def _bw(fn, nbytes: int, reps: int = 8) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return reps * nbytes / (time.perf_counter() - t) / 1e9


def main() -> None:
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    reused = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)

    def fresh_pinned():
        with torch.cuda.stream(side):
            torch.empty(n, dtype=torch.uint8, pin_memory=True).copy_(src, non_blocking=True)

    def reused_pinned():
        with torch.cuda.stream(side):
            reused.copy_(src, non_blocking=True)

    def h2d_reused():
        with torch.cuda.stream(side):
            src.copy_(reused, non_blocking=True)

    out = {"d2h_fresh_pinned_gbs": _bw(fresh_pinned, n), "d2h_reused_pinned_gbs": _bw(reused_pinned, n),
           "h2d_reused_pinned_gbs": _bw(h2d_reused, n), "d2h_pageable_gbs": _bw(lambda: pageable.copy_(src), n)}
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
