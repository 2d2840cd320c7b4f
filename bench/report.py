"""Markdown tables from bench/results/*.json (speed_bench output), for docs/benchmarks.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [f"`{path.name}` — {d['shape']}, seq {d['seq']}, {d['gpu']}, torch {d['torch']}, median of {d['steps']} "
             f"steps after {d['warmup']} warm-up", "",
             "| variant | method | ckpt | micro batch | Liger | tokens/s | MFU | peak alloc GB | peak reserved GB | x peer default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if r["ok"]:
            lines.append(f"| {r['variant']} | {r['method']} | {r['ckpt']} | {r['micro_batch']} | {r['liger']} | "
                         f"{r['tokens_per_s']:.0f} | {r['mfu']:.3f} | {r['peak_alloc_gb']:.2f} | "
                         f"{r['peak_reserved_gb']:.2f} | {r.get('x_peer_default', '')} |")
        else:
            lines.append(f"| {r['variant']} | {r['method']} | {r['ckpt']} | {r['micro_batch']} | {r['liger']} | "
                         f"failed: {r.get('error', '')[:80]} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(Path(p)))
        print()
