"""Multi-GPU shardtune runs (FSDP2, DeepSpeed ZeRO-2/3, DDP) with per-GPU memory, balance and tokens/s.

    torchrun --nproc-per-node 2 bench/dist_bench.py --shape llama3-8b --strategy fsdp --mb 2 --ckpt 1 \
        [--cap 24] [--method qlora] [--zero-stage 3] [--offload] [--random] --out result.json

Weights: --random builds them directly in 4-bit on each rank from config.json alone (no checkpoint; needed for
70B shapes, whose checkpoint does not fit on the device's disk); otherwise a random bf16 checkpoint is written to
/tmp first (by rank 0) and streamed in. Also runs with plain `python` (1 process, strategy none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (H100_BF16_CEILING, model_flops_per_token, random_samples, write_config_dir,  # noqa: E402
                          write_random_checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--ckpt", type=int, default=1)
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--strategy", default="fsdp")
    ap.add_argument("--zero-stage", type=int, default=3)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--cap", type=float, default=0.0, help="GB of GPU memory each process may use")
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--liger", type=int, default=1)
    ap.add_argument("--layers-per-unit", type=int, default=0, help="fsdp: decoder layers per FSDP unit (0 = auto)")
    ap.add_argument("--pin-cpus", action="store_true", help="pin each rank to its share of this machine's cores")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--keep-strategy", action="store_true",
                    help="one process: run --strategy as given (FSDP2 / ZeRO-3 on one rank) instead of none")
    ap.add_argument("--set", nargs="*", default=[], help="extra shardtune overrides key=value")
    ap.add_argument("--profile", default="", help="also write a torch.profiler trace of 2 steps (rank 0) here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    if args.pin_cpus:  # an experiment: does pinning each rank to its own cores steady a host-bound step?
        cores = sorted(os.sched_getaffinity(0))
        n = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        per = len(cores) // max(1, n)
        os.sched_setaffinity(0, cores[local * per:(local + 1) * per] or cores)
    if args.cap:
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * 1e9 / total), local)
    if args.random:
        model_dir = Path(f"/tmp/cfg-{args.shape}")
        if rank == 0 or world == 1:
            write_config_dir(args.shape, model_dir)
    else:
        model_dir = Path(f"/tmp/bench-{args.shape}")
        if rank == 0:
            write_random_checkpoint(args.shape, model_dir)
    while not (model_dir / "config.json").exists():  # both writers rename a complete directory into place
        time.sleep(1)

    from shardtune.config import load_config
    from shardtune.train.loop import Trainer
    if world == 1 and args.keep_strategy and not dist.is_initialized():  # one-rank FSDP2 / ZeRO-3 need a group
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    data = Path(f"/tmp/bench-data-{rank}.jsonl")
    data.write_text("".join(json.dumps({"text": f"sample {i}"}) + "\n" for i in range(64)))
    strategy = "none" if world == 1 and args.strategy in ("fsdp", "ddp") and not args.keep_strategy else args.strategy
    ov = [f"model.name_or_path={model_dir}", f"model.random_init={args.random}", f"data.path={data}",
          "data.format=text", f"data.max_seq_len={args.seq}", f"train.method={args.method}",
          f"train.micro_batch_size={args.mb}", f"train.grad_accum={args.accum}",
          f"train.max_steps={args.steps + args.warmup}", f"train.gradient_checkpointing={bool(args.ckpt)}",
          f"train.kernels={'auto' if args.liger else 'none'}", f"train.precision={args.precision}",
          "train.eval_every=0", "train.log_every=5", "output.dir=/tmp/dist-out", "output.overwrite=true",
          "output.tensorboard=false",
          "output.plot=false", "lora.rank=16", "lora.alpha=32", "train.warmup_steps=0",
          f"parallel.strategy={strategy}", f"parallel.zero_stage={args.zero_stage}",
          f"parallel.offload_optimizer={args.offload}", f"parallel.offload_param={args.offload}",
          f"parallel.fsdp_layers_per_unit={args.layers_per_unit}"] + list(args.set)
    cfg = load_config(None, ov)
    t0 = time.time()
    tr = Trainer(cfg, out=lambda m: print(m, flush=True), time_steps=True)
    tr.setup()
    setup_s = time.time() - t0
    gb = args.mb * args.accum * world
    tr.use_samples(random_samples(gb * (args.steps + args.warmup), args.seq, json.loads(
        (model_dir / "config.json").read_text())["vocab_size"]))
    after_setup = (torch.cuda.memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9)
    setup_peak = (torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9)  # load + wrap
    torch.cuda.reset_peak_memory_stats()
    prof = _start_profiler(tr, args, rank) if args.profile else None
    res = tr.run()
    if prof is not None:
        _finish_profiler(prof, args, rank)
    import psutil
    mine = {"rank": rank, "param_bytes": tr.engine.local_param_bytes(), "alloc_after_setup_gb": after_setup[0],
            "reserved_after_setup_gb": after_setup[1], "setup_peak_alloc_gb": setup_peak[0],
            "setup_peak_reserved_gb": setup_peak[1], "peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
            "cpu_rss_gb": psutil.Process().memory_info().rss / 1e9,
            "load_report": getattr(getattr(tr.engine.unwrapped(), "load_report", None), "to_dict", lambda: None)()}
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    if rank == 0:
        times = tr.step_times[args.warmup:]
        med = statistics.median(times)
        tps = gb * args.seq / med
        pb = [r["param_bytes"] for r in ranks]
        mean = sum(pb) / len(pb)
        out = {"args": vars(args), "world": world, "gpu": torch.cuda.get_device_name(0), "strategy": strategy,
               "loss_path": "fused" if tr.fused else "logits", "kernels": tr.kernels,
               "fsdp_layers_per_unit": getattr(tr.engine.unwrapped(), "fsdp_layers_per_unit", None),
               "setup_s": round(setup_s, 1), "median_step_s": round(med, 4), "tokens_per_s": round(tps, 1),
               "tokens_per_s_per_gpu": round(tps / world, 1),
               "mfu": round(tps / world * model_flops_per_token(args.shape, args.seq, bool(args.ckpt))
                            / H100_BF16_CEILING, 4),
               "param_bytes_max_dev_from_mean": round(max(abs(b - mean) for b in pb) / mean, 4),
               "step_times": [round(t, 4) for t in times], "ranks": ranks,
               "losses": [round(x, 4) for x in res.losses]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print("RESULT " + json.dumps({k: v for k, v in out.items() if k not in ("step_times", "ranks", "losses")}),
              flush=True)
        for r in ranks:
            print(f"  rank {r['rank']}: params {r['param_bytes'] / 1e9:.2f} GB, after setup {r['alloc_after_setup_gb']:.2f} "
                  f"GB, peak alloc {r['peak_alloc_gb']:.2f} GB, peak reserved {r['peak_reserved_gb']:.2f} GB, "
                  f"RSS {r['cpu_rss_gb']:.1f} GB", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _start_profiler(tr, args, rank: int):
    """Profile two steps after the warm-up (and one more); each profiled step ends after a device synchronize, so
    its span holds all of its GPU work."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=args.warmup + 1, warmup=1, active=2, repeat=1))
    prof.start()
    step = tr.engine.step

    def profiled_step(*a, **kw):
        out = step(*a, **kw)
        torch.cuda.synchronize()
        prof.step()
        return out

    tr.engine.step = profiled_step
    return prof


def _finish_profiler(prof, args, rank: int) -> None:
    import gzip
    import shutil
    prof.stop()
    if rank != 0:
        return
    out = Path(args.profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".tmp.json")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(str(out), "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    from bench.trace_summary import summarize
    for row in summarize(str(out)):
        print("PROFILE " + json.dumps(row), flush=True)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
    out.with_name(out.name.replace(".json.gz", "") + ".ops.txt").write_text(table)


if __name__ == "__main__":
    main()
