"""The Hugging Face peer's GPU memory against `shardtune plan --stack hf`, one process per configuration.

    python bench/hf_peer_memory.py --shape llama3-3b --seq 2048 --out bench/results/hf_peer_memory_h200.json \
        --variants ckpt=0,mb=1 ckpt=1,mb=2 ...

The peer is bench/common.py's (bitsandbytes NF4 + double quantization, prepare_model_for_kbit_training, peft LoRA
r16/alpha 32/dropout 0.05 on all linears) trained by HF Trainer (bench/common.py's peer_training_args, the data collator of
bench/speed_bench.py) on random tokens. A plain list is the dataset (no `datasets` needed). Per configuration:
allocated and reserved memory after the model is built (before training) and their peaks over the steps, next to
what the planner predicts for the same configuration with the HF profile (fp32 LoRA, adamw).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import peer_model, peer_training_args, random_samples, write_random_checkpoint  # noqa: E402
from shardtune.plan.calibrate import BENCH_SHAPES  # noqa: E402

def parse(text: str) -> dict:
    v = {"ckpt": 1, "mb": 2}
    for kv in filter(None, text.split(",")):
        k, val = kv.split("=")
        v[k] = int(val)
    return v


def planned(shape: str, seq: int, v: dict) -> dict:
    from shardtune.config import load_config
    from shardtune.hardware import parse_gpus
    from shardtune.plan import estimate
    cfg = load_config(None, [f"model.name_or_path={BENCH_SHAPES[shape]}", "train.method=qlora", "lora.rank=16",
                             "lora.alpha=32", "lora.dropout=0.05", f"train.micro_batch_size={v['mb']}",
                             f"train.gradient_checkpointing={'true' if v['ckpt'] else 'false'}",
                             f"data.max_seq_len={seq}", "train.precision=bf16", "parallel.strategy=none"])
    m = estimate(cfg, parse_gpus("1xH200"), stack={"stack": "hf", "lora_dtype": "fp32", "optimizer": "adamw"}).memory
    return {"alloc_gb": round(m.peak_allocated / 1e9, 3), "reserved_gb": round(m.peak_reserved / 1e9, 3),
            "phase": m.peak_phase}


def worker(args) -> None:
    import torch
    from transformers import Trainer, default_data_collator
    v = json.loads(args.worker)
    model = peer_model(args.model_dir, "qlora", bool(v["ckpt"]))
    torch.cuda.synchronize()
    after_load = (torch.cuda.memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9,
                  torch.cuda.max_memory_reserved() / 1e9)
    data = random_samples(v["mb"] * args.steps, args.seq, model.config.vocab_size)
    targs = peer_training_args("/tmp/peer-mem-out", v["mb"], args.steps, bool(v["ckpt"]))
    torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator).train()
    stats = torch.cuda.memory_stats()
    # the allocator's segments once training is done: nothing was released (no empty_cache, no retries), so these
    # are the segments of the reserved peak; the large ones with the sizes of their blocks, live or free
    segments = [{"size_gb": round(seg["total_size"] / 1e9, 4), "allocated_gb": round(seg["allocated_size"] / 1e9, 4),
                 "blocks_gb": [[round(b["size"] / 1e9, 4), b["state"]] for b in seg["blocks"]
                               if b["size"] >= 64e6]}
                for seg in torch.cuda.memory_snapshot() if seg["total_size"] >= 256e6]
    Path(args.result).write_text(json.dumps({
        "large_segments": segments,
        "ok": True, "load_alloc_gb": round(after_load[0], 3), "load_reserved_gb": round(after_load[1], 3),
        "load_peak_reserved_gb": round(after_load[2], 3),
        "peak_alloc_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
        "num_alloc_retries": stats.get("num_alloc_retries", 0),
        "segments_large_peak": stats.get("segment.large_pool.peak", 0)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-3b", choices=sorted(BENCH_SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["ckpt=1,mb=2", "ckpt=0,mb=1"])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--result", default=None)
    args = ap.parse_args()
    args.model_dir = args.model_dir or f"/tmp/bench-{args.shape}"
    if args.worker:
        return worker(args)
    rows = []
    for text in args.variants:
        v = parse(text)
        row = {"variant": text, **v, "planned": planned(args.shape, args.seq, v)}
        if args.out is None:          # planning only (here, before a GPU call: the predictions)
            rows.append(row)
            print(json.dumps(row))
            continue
        write_random_checkpoint(args.shape, Path(args.model_dir))
        res = Path(f"/tmp/peer-mem-{len(rows)}.json")
        t0 = time.time()
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(v), "--result", str(res), "--shape",
                        args.shape, "--seq", str(args.seq), "--steps", str(args.steps), "--model-dir", args.model_dir],
                       check=False)
        r = json.loads(res.read_text()) if res.exists() else {"ok": False, "error": "worker died (see log)"}
        row.update(r, wall_s=round(time.time() - t0, 1))
        if r.get("ok"):
            row["alloc_err"] = round(row["planned"]["alloc_gb"] / r["peak_alloc_gb"] - 1, 4)
            row["reserved_err"] = round(row["planned"]["reserved_gb"] / r["peak_reserved_gb"] - 1, 4)
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    if args.out:
        import torch
        Path(args.out).write_text(json.dumps({"shape": args.shape, "seq": args.seq, "steps": args.steps,
                                              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                              "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
