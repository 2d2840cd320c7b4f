"""What a run reports: console progress, metrics.jsonl, TensorBoard, loss.png, memory and throughput numbers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) on this rank's GPU in GB; CPU runs report process RSS for both."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.max_memory_reserved(device) / 1e9
    import psutil
    rss = psutil.Process().memory_info().rss / 1e9
    return rss, rss


def mfu(tokens_per_s: float, n_params: int, n_layers: int, hidden: int, seq: int, recompute: bool,
        peak_flops: float) -> float:
    """Model FLOPs utilisation: (6N with recomputation, else 4N... see docs/benchmarks.md) per token over peak."""
    # Forward 2N, input-grad 2N; recomputation adds a second forward. Attention: 2*2*seq*hidden per layer per token
    # forward (QK^T and AV, causal halves it), times 3 with backward.
    mult = 6 if recompute else 4
    attn = 6 * n_layers * seq * hidden
    return tokens_per_s * (mult * n_params + attn) / peak_flops


class MetricsLog:
    """Writes one JSON line per event to metrics.jsonl and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.fh = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception as e:  # tensorboard missing or broken: metrics.jsonl still has everything
                print(f"warning: TensorBoard disabled ({type(e).__name__}: {e})", file=sys.stderr)

    def log(self, step: int, **scalars) -> None:
        row = {"step": step, "time": round(time.time(), 3), **scalars}
        self.rows.append(row)
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        if self.tb:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and v == v:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb:
                self.tb.close()


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
