"""Where a training step's GPU time goes, from a torch.profiler chrome trace.

    python bench/trace_summary.py trace.json.gz

Per profiled step: wall time (the ProfilerStep span), busy time of each CUDA stream (union of its kernels and
memcpys), NCCL kernel time, and the time the busiest (compute) stream sat idle, split into the gaps before the first
kernel, inside the step and after the last one. Used to find why a sharded run's per-GPU throughput is below the
one-GPU run's (docs/benchmarks.md).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    steps = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events  # the CPU-side span of each step
                   if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                   and e.get("name", "").startswith("ProfilerStep#"))
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("user_annotation", "cpu_op")]
    out = []
    for lo, hi, name in steps:
        # a step's GPU work can finish after its CPU span ends: take kernels launched inside [lo, next step)
        inside = [e for e in gpu if lo <= e["ts"] < hi]
        streams: dict[int, list] = defaultdict(list)
        nccl = 0.0
        for e in inside:
            streams[e.get("args", {}).get("stream", -1)].append((e["ts"], e["ts"] + e["dur"]))
            if "nccl" in e["name"].lower():
                nccl += e["dur"]
        busy = {s: _union(v) for s, v in streams.items()}
        main = max(busy, key=busy.get) if busy else None
        row = {"step": name, "wall_ms": (hi - lo) / 1e3,
               "stream_busy_ms": {str(s): round(b / 1e3, 1) for s, b in sorted(busy.items(), key=lambda x: -x[1])},
               "nccl_kernel_ms": round(nccl / 1e3, 1)}
        if main is not None:
            spans = sorted(streams[main])
            first, last = spans[0][0], max(b for _, b in spans)
            row.update(main_stream=main, main_idle_before_ms=round((first - lo) / 1e3, 1),
                       main_idle_inside_ms=round(((last - first) - busy[main]) / 1e3, 1),
                       main_idle_after_ms=round(max(0.0, hi - last) / 1e3, 1))
            # the largest idle gaps of the compute stream and the CPU annotations running when each began
            gaps, end = [], spans[0][1]
            for a, b in spans[1:]:
                if a > end:
                    gaps.append((a - end, end))
                end = max(end, b)
            top = []
            for g, at in sorted(gaps, reverse=True)[:8]:
                names = [e["name"] for e in cpu_ops if e["ts"] <= at <= e["ts"] + e["dur"] and e["dur"] < 1e7]
                top.append({"gap_ms": round(g / 1e3, 2), "at_ms": round((at - lo) / 1e3, 1),
                            "cpu": [n for n in names if not n.startswith("ProfilerStep")][-3:]})
            row["largest_gaps"] = top
        # CPU time by annotation (FSDP, optimizer, checkpointing ...), top 15
        ann: dict[str, float] = defaultdict(float)
        for e in cpu_ops:
            if lo <= e["ts"] < hi and e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep"):
                ann[e["name"]] += e["dur"]
        row["cpu_annotations_ms"] = {k: round(v / 1e3, 1) for k, v in sorted(ann.items(), key=lambda x: -x[1])[:15]}
        out.append(row)
    return out


if __name__ == "__main__":
    for row in summarize(sys.argv[1]):
        print(json.dumps(row, indent=1))
