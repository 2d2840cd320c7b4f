"""`plan: auto` on packed real text: the planner's choice and prediction against the measured peak (issue 15).

    python bench/plan_auto_bench.py prep                       # here: Spider (alpaca format) -> .devdata/
    python bench/plan_auto_bench.py run --out $OUT/plan_auto_spider_h200.json   # on the GPU machine

`prep` copies the Spider dev set in alpaca format from the shared data folder (not in the repository) into
.devdata/ (ignored through .git/info/exclude; the device call carries it). `run` writes a random Llama-3-8B-shaped
checkpoint (bench/common.py), trains a few steps with `plan.mode=auto`, method qlora, data packed to 2048 tokens,
and records the chosen setup, its predicted peaks, the usable budget (GPU memory minus plan.margin) and torch's
measured peak reserved/allocated. On a machine without CUDA (a tiny shape, for testing) the measurements are null.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_SPIDER = Path("/work/shared/data/text2sql/spider_dev_alpaca.json")
DEVDATA = REPO / ".devdata" / "spider_dev_alpaca.json"


def prep(src: Path = SHARED_SPIDER, dst: Path = DEVDATA) -> Path:
    records = json.loads(src.read_text())
    if not isinstance(records, list) or not records or "instruction" not in records[0]:
        raise SystemExit(f"{src}: expected a list of alpaca records")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    print(f"{len(records)} Spider records -> {dst.relative_to(REPO)}")
    return dst


def _spider_tokenizer(model_dir: Path, data: Path, vocab: int = 8000) -> None:
    """The random checkpoint's tokenizer knows 300 tokens of 'sample text'; a BPE trained on the Spider records
    gives real-text lengths (what packing fills rows with). Ids stay far below the model's vocabulary."""
    from shardtune.builtin.tiny_model import build_tokenizer
    mark = model_dir / "spider_tokenizer.txt"
    if mark.exists():
        return
    vocab = min(vocab, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    recs = json.loads(Path(data).read_text())
    build_tokenizer([r["instruction"] + " " + r.get("input", "") + " " + r["output"] for r in recs],
                    vocab_size=vocab).save_pretrained(model_dir)
    mark.write_text(f"{vocab} BPE tokens trained on {data}\n")


def run(args) -> dict:
    import torch
    from bench.common import write_random_checkpoint
    from shardtune.config import load_config
    from shardtune.train.loop import Trainer

    cuda = torch.cuda.is_available()
    if args.random:  # config.json + tokenizer only; weights drawn on the GPU chunk by chunk (model.random_init)
        from bench.common import write_config_dir
        model_dir = write_config_dir(args.shape, Path(f"/tmp/plan-auto-cfg-{args.shape}"))
    else:
        model_dir = write_random_checkpoint(args.shape, Path(f"/tmp/plan-auto-{args.shape}"),
                                            device="cuda" if cuda else "cpu")
    _spider_tokenizer(model_dir, args.data)
    ov = [f"model.name_or_path={model_dir}", f"data.path={args.data}", "data.format=alpaca", "data.packing=true",
          f"data.max_seq_len={args.seq}", "data.val_fraction=0", "train.method=qlora",
          f"train.micro_batch_size={args.global_batch}", "train.grad_accum=1", f"train.max_steps={args.steps}",
          "train.eval_every=0", "train.log_every=1", "train.warmup_steps=0", "train.save_every=0",
          "plan.mode=auto", f"output.dir={args.workdir}", "output.overwrite=true", "output.report_to=none",
          "output.plot=false", f"model.random_init={bool(args.random)}"]
    if args.gpus:
        ov.append(f"plan.gpus={args.gpus}")
    if not cuda:
        ov.append("train.precision=fp32")
    cfg = load_config(None, ov)
    lines: list[str] = []
    tr = Trainer(cfg, out=lambda m: (lines.append(str(m)), print(m, flush=True)), time_steps=True)
    t0 = time.time()
    tr.setup()
    est = tr.estimate
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr.run()
    wall = time.time() - t0
    m = est.memory
    measured_reserved = torch.cuda.max_memory_reserved() if cuda else None
    measured_alloc = torch.cuda.max_memory_allocated() if cuda else None
    res = {
        "bench": "plan_auto", "shape": args.shape, "data": str(args.data), "seq": args.seq, "packing": True,
        "global_batch": args.global_batch, "steps": args.steps, "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__, "chosen": est.setup.label, "setup": est.setup.to_dict(),
        "predicted_peak_reserved": m.peak_reserved, "predicted_peak_allocated": m.peak_allocated,
        "predicted_device_total": m.device_total, "budget_bytes": m.budget, "margin": est.margin,
        "usable_bytes": est.usable_bytes, "measured_peak_reserved": measured_reserved,
        "measured_peak_allocated": measured_alloc,
        "measured_device_total": (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) if cuda else None,
        "reserved_error": (m.peak_reserved / measured_reserved - 1) if measured_reserved else None,
        "under_usable": (measured_reserved <= est.usable_bytes) if measured_reserved else None,
        "wall_s": round(wall, 1), "alloc_conf": __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF"), "log": [ln for ln in lines if ln.startswith(("plan", "data", "kernels", "warn"))],
        "predicted_tokens_per_s": est.speed.tokens_per_s, "step_times": [round(t, 4) for t in tr.step_times],
        "step_log": [ln for ln in lines if ln.lstrip().startswith("step")],
    }
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prep")
    r = sub.add_parser("run")
    r.add_argument("--shape", default="llama3-8b")
    r.add_argument("--data", type=Path, default=DEVDATA)
    r.add_argument("--seq", type=int, default=2048)
    r.add_argument("--global-batch", type=int, default=8, help="auto searches micro batches dividing this")
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--gpus", default="", help="plan.gpus (default: the GPUs torch sees)")
    r.add_argument("--workdir", default="/tmp/plan-auto-out")
    r.add_argument("--random", action="store_true", help="no checkpoint: random weights built on the device")
    r.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "prep":
        prep()
        return 0
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("setup", "log")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
