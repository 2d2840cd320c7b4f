"""Speed and memory, shardtune against the Hugging Face peer (Trainer + peft + bitsandbytes), in one run.

    python bench/speed_bench.py --shape llama3-8b --seq 2048 --out bench/results/speed_h100.json \
        --variants peer:ckpt=1,mb=2 peer:ckpt=0,mb=2 st:ckpt=0,mb=4 ...

Each variant runs in its own process (clean CUDA memory statistics) on the same random-weight checkpoint, written
once to --model-dir, and the same random token data. Reported per variant: median step time over the measured
steps (warm-up excluded), tokens/s, MFU, peak allocated and reserved memory per GPU, and the ratio to the peer's
default (ckpt=1, mb=2, no Liger). Variant keys: ckpt (gradient checkpointing 0/1), mb (micro batch), liger (0/1),
method (qlora/lora), fused (shardtune fused loss 0/1), cap (GB: cap this process's GPU memory); shardtune only:
cl (train.checkpoint_layers: recompute only this many layers), fl (train.fused_lora 0/1), off
(train.offload_activations 0/1), ol (train.offload_layers: with off=1, only this many layers), comp
(train.compile 0/1), sac (train.checkpoint_policy=selective 0/1: recomputed
layers keep their matmul and attention outputs; MFU then counts no matmul recompute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (H100_BF16_CEILING, SHAPES, model_flops_per_token, peer_model,  # noqa: E402
                          peer_training_args, random_samples, step_timer, write_random_checkpoint)

PEER_DEFAULT = "peer:ckpt=1,mb=2"


def parse_variant(text: str) -> dict:
    kind, _, rest = text.partition(":")
    v = {"kind": kind, "ckpt": 1, "mb": 2, "liger": 0, "method": "qlora", "fused": 1, "cap": 0, "label": text,
         "cl": 0, "fl": 1, "off": 0, "comp": 0, "sac": 0, "ol": -1}
    for kv in filter(None, rest.split(",")):
        k, val = kv.split("=")
        v[k] = val if k == "method" else float(val) if k == "cap" else int(val)
    return v


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _peak() -> tuple[float, float]:
    import torch
    if not _cuda():
        import psutil
        rss = psutil.Process().memory_info().rss / 1e9
        return rss, rss
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def _cap(gb: float) -> None:
    import torch
    if gb and _cuda():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total), 0)


# ------------------------------------------------------------------------------------------------ the peer

def run_peer(v: dict, model_dir: str, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, default_data_collator
    _cap(v["cap"])
    model = peer_model(model_dir, v["method"], bool(v["ckpt"]))
    vocab = model.config.vocab_size
    n = v["mb"] * (steps + warmup)
    data = Dataset.from_list(random_samples(n, seq, vocab))
    times: list[float] = []
    args = peer_training_args("/tmp/peer-out", v["mb"], steps + warmup, bool(v["ckpt"]), bool(v["liger"]))
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            callbacks=[step_timer(times)]).train()
    alloc, reserved = _peak()
    return {"times": times[warmup:], "peak_alloc": alloc, "peak_reserved": reserved}


# ------------------------------------------------------------------------------------------------ shardtune

def run_shardtune(v: dict, model_dir: str, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from shardtune.config import load_config
    from shardtune.train.loop import Trainer
    _cap(v["cap"])
    data = Path("/tmp/bench-data.jsonl")
    data.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(64)))
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.path={data}", "data.format=text",
                             f"data.max_seq_len={seq}", f"train.method={v['method']}", f"train.micro_batch_size={v['mb']}",
                             f"train.max_steps={steps + warmup}", f"train.gradient_checkpointing={bool(v['ckpt'])}",
                             f"train.kernels={('liger' if _cuda() else 'auto') if v['liger'] else 'none'}", f"train.fused_loss={bool(v['fused'])}",
                             "train.eval_every=0", "train.log_every=1000", "output.dir=/tmp/st-out", "output.overwrite=true",
                             "output.tensorboard=false", "output.plot=false", "lora.rank=16", "lora.alpha=32",
                             "lora.dropout=0.05", "train.lr=2e-4", "train.warmup_steps=0",
                             f"train.checkpoint_layers={v['cl'] or 'null'}", f"train.fused_lora={bool(v['fl'])}",
                             f"train.offload_activations={bool(v['off'])}", f"train.compile={bool(v['comp'])}",
                             f"train.checkpoint_policy={'selective' if v['sac'] else 'layer'}",
                             f"train.offload_layers={v['ol'] if v['ol'] >= 0 else 'null'}"])
    tr = Trainer(cfg, out=lambda m: print(m, flush=True), time_steps=True)
    tr.setup()
    tr.use_samples(random_samples(v["mb"] * (steps + warmup), seq, SHAPES_VOCAB(model_dir)))
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    tr.run()
    alloc, reserved = _peak()
    out = {"times": tr.step_times[warmup:], "peak_alloc": alloc, "peak_reserved": reserved,
           "kernels": tr.kernels, "fused": tr.fused, "fused_lora_layers": getattr(tr, "fused_lora", None)}
    if v["comp"]:
        from torch._dynamo.utils import counters
        out["compile_stats"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                                "graph_breaks": dict(counters["graph_break"])}
    if v["off"]:
        out["offload_stats"] = tr.offload.stats.format()
    return out


def SHAPES_VOCAB(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


# ------------------------------------------------------------------------------------------------ driver

def worker(args) -> None:
    v = json.loads(args.worker)
    fn = run_peer if v["kind"] == "peer" else run_shardtune
    try:
        r = fn(v, args.model_dir, args.seq, args.steps, args.warmup)
        r["ok"] = True
    except Exception as e:  # an OOM or failure is a result too
        import traceback
        traceback.print_exc()
        r = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    Path(args.result).write_text(json.dumps(r))


def summarise(v: dict, r: dict, shape: str, seq: int) -> dict:
    row = {"variant": v["label"], "kind": v["kind"], "method": v["method"], "ckpt": v["ckpt"], "micro_batch": v["mb"],
           "liger": v["liger"], "cap_gb": v["cap"], "ok": r.get("ok", False),
           "checkpoint_layers": v.get("cl", 0), "fused_lora": v.get("fl", 1), "offload_activations": v.get("off", 0),
           "compile": v.get("comp", 0), "checkpoint_policy": "selective" if v.get("sac") else "layer",
           "offload_layers": v.get("ol", -1) if v.get("ol", -1) >= 0 else None}
    if not row["ok"]:
        row["error"] = r.get("error")
        return row
    med = statistics.median(r["times"])
    tps = v["mb"] * seq / med
    row.update(steps_measured=len(r["times"]), median_step_s=round(med, 4), tokens_per_s=round(tps, 1),
               mfu=round(tps * model_flops_per_token(shape, seq, _recomputed(v, shape)) / H100_BF16_CEILING, 4),
               mfu_no_recompute=round(tps * model_flops_per_token(shape, seq, 0.0) / H100_BF16_CEILING, 4),
               peak_alloc_gb=round(r["peak_alloc"], 3), peak_reserved_gb=round(r["peak_reserved"], 3),
               step_times=[round(t, 4) for t in r["times"]])
    for k in ("kernels", "fused", "fused_lora_layers", "compile_stats", "offload_stats"):
        if k in r:
            row[k] = r[k]
    return row


def _recomputed(v: dict, shape: str) -> float:
    from bench.common import SHAPES
    if not v["ckpt"] or v["kind"] != "st":
        return float(bool(v["ckpt"]))
    if v.get("sac"):
        return 0.0  # selective checkpointing recomputes no base matmul (only LoRA's B and element-wise ops)
    layers = SHAPES[shape]["num_hidden_layers"]
    return min(v.get("cl") or layers, layers) / layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--variants", nargs="+", default=[PEER_DEFAULT, "st:ckpt=0,mb=4,liger=1"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    args.model_dir = args.model_dir or f"/tmp/bench-{args.shape}"
    if args.worker:
        return worker(args)

    import torch
    t0 = time.time()
    write_random_checkpoint(args.shape, Path(args.model_dir), device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"checkpoint ready in {time.time() - t0:.0f} s: {args.model_dir}", flush=True)
    rows = []
    for text in args.variants:
        v = parse_variant(text)
        res_file = Path(f"/tmp/bench-result-{len(rows)}.json")
        t1 = time.time()
        cmd = [sys.executable, __file__, "--worker", json.dumps(v), "--result", str(res_file), "--shape", args.shape,
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--model-dir", args.model_dir]
        subprocess.run(cmd, check=False)
        r = json.loads(res_file.read_text()) if res_file.exists() else {"ok": False, "error": "worker died"}
        row = summarise(v, r, args.shape, args.seq)
        row["wall_s"] = round(time.time() - t1, 1)
        rows.append(row)
        print("RESULT " + json.dumps({k: row[k] for k in row if k != "step_times"}), flush=True)
    peer = next((r for r in rows if r["variant"] == PEER_DEFAULT and r["ok"]), None)
    peers_ok = [r for r in rows if r["kind"] == "peer" and r["ok"]]
    best_peer = max(peers_ok, key=lambda r: r["tokens_per_s"]) if peers_ok else None
    for r in rows:
        if r["ok"] and peer:
            r["x_peer_default"] = round(r["tokens_per_s"] / peer["tokens_per_s"], 3)
        if r["ok"] and best_peer:
            r["x_best_peer"] = round(r["tokens_per_s"] / best_peer["tokens_per_s"], 3)
    out = {"shape": args.shape, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "command": " ".join(sys.argv),
           "mfu_ceiling_flops": H100_BF16_CEILING, "rows": rows}
    print(f"{'variant':38s} {'tok/s':>9s} {'MFU':>6s} {'alloc':>7s} {'resv':>7s} {'x peer':>7s}")
    for r in rows:
        if r["ok"]:
            print(f"{r['variant']:38s} {r['tokens_per_s']:9.0f} {r['mfu']:6.3f} {r['peak_alloc_gb']:7.2f} "
                  f"{r['peak_reserved_gb']:7.2f} {r.get('x_peer_default', 0):7.2f}")
        else:
            print(f"{r['variant']:38s} FAILED {r.get('error')}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
