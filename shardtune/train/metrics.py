"""What a run reports: console progress, metrics.jsonl, TensorBoard, loss.png, memory and throughput numbers."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# what a run's metrics write into output.dir (every backend): train/checkpoint.py counts these as a run's outputs
METRIC_OUTPUTS = ("metrics.jsonl", "tensorboard", "loss.png", "wandb", "wandb_run_id.txt", "mlruns",
                  "mlflow_run_id.txt")


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
    """One run's metrics (rank 0 only): metrics.jsonl always, plus the backends in output.report_to (tensorboard,
    wandb, mlflow). A resumed run (start_step > 0) keeps the earlier rows up to start_step and drops the ones the
    interrupted run wrote after its last checkpoint, so every file tells one consistent history."""

    def __init__(self, out_dir: Path, enabled: bool, report_to=("tensorboard",), start_step: int = 0,
                 run_config: dict | None = None):
        if isinstance(report_to, bool):  # the earlier signature: a tensorboard on/off switch
            report_to = ["tensorboard"] if report_to else []
        self.enabled, self.out_dir = enabled, Path(out_dir)
        self.rows: list[dict] = []
        self.tb = self.wandb = self.mlflow = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if start_step > 0 and self.path.is_file():
            kept = [r for r in map(json.loads, filter(None, self.path.read_text().splitlines()))
                    if r.get("step", 0) <= start_step]
            self.rows = kept
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()  # a fresh run: the train loop refuses or clears a dir holding another run first
        self.fh = self.path.open("a")
        for backend in report_to:
            try:
                getattr(self, f"_open_{backend}")(start_step, run_config or {})
            except ImportError as e:
                print(f"warning: output.report_to={backend} skipped: {e.name or backend} is not installed "
                      f"(pip install 'shardtune[{backend}]'); metrics.jsonl has everything", file=sys.stderr)

    def _open_tensorboard(self, start_step: int, run_config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides events a crashed run wrote after the checkpoint this run resumed from
        self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step or None)

    def _open_wandb(self, start_step: int, run_config: dict) -> None:
        import wandb
        id_file = self.out_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        # offline unless the user configured wandb: a first run needs no account and no network
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb.init(dir=str(self.out_dir), id=run_id, resume="allow", mode=mode, config=run_config,
                                project=os.environ.get("WANDB_PROJECT", "shardtune"), name=self.out_dir.name)

    def _open_mlflow(self, start_step: int, run_config: dict) -> None:
        import mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store in the run dir; no server needed
            mlflow.set_tracking_uri((self.out_dir / "mlruns").resolve().as_uri())
        id_file = self.out_dir / "mlflow_run_id.txt"
        if start_step > 0 and id_file.is_file():
            self.mlflow = mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.mlflow = mlflow.start_run(run_name=self.out_dir.name)
            id_file.write_text(self.mlflow.info.run_id)
            flat = _flatten(run_config)
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, step: int, **scalars) -> None:
        row = {"step": step, "time": round(time.time(), 3), **scalars}
        self.rows.append(row)
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        numbers = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and v == v}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)
        if self.mlflow:
            import mlflow
            mlflow.log_metrics(numbers, step=step)

    def locations(self, plot: bool = True) -> dict[str, Path]:
        """Where this run's metrics went: name -> path (for the end-of-run summary)."""
        if not self.enabled:
            return {}
        where = {"metrics": self.path}
        if self.tb:
            where["tensorboard"] = self.out_dir / "tensorboard"
        if self.wandb:
            where["wandb"] = Path(self.wandb.dir).parent
        if self.mlflow:
            where["mlflow"] = self.out_dir / "mlruns" if not os.environ.get("MLFLOW_TRACKING_URI") else Path(
                os.environ["MLFLOW_TRACKING_URI"])
        if plot:
            where["plot"] = self.out_dir / "loss.png"
        return where

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()
            if self.mlflow:
                import mlflow
                mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
