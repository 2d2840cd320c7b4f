"""Load benchmark (issue 4): how long, how much CPU RAM and how much GPU memory it takes to bring a big model up.

Two measurements, each in fresh processes so imports and earlier runs do not pollute the numbers:
  ckpt    a 13B/14B-shaped random checkpoint (bf16 safetensors shards) is written to local disk, shard by shard (the
          writer never holds more than one shard), then loaded with QLoRA through shardtune's streamed loader on
          1 GPU (strategy none) and on N GPUs (torchrun, FSDP2 via shardtune.parallel.fsdp.shard_model).
          --reference adds the one-process from_pretrained path on 1 GPU for comparison.
  random  a 70B-shaped model built directly in 4-bit across N GPUs: no checkpoint, random weights generated and
          quantized chunk by chunk on each GPU (shardtune.model.random_weights.RandomEntry), each rank keeping its
          shard.

Usage (device):   python bench/load_bench.py --out bench/results/load_gpu.json
                  python bench/load_bench.py --mode random --random-shape llama2-70b --random-nproc 2 --out ...
CPU smoke test:   python bench/load_bench.py --dry-run --out /tmp/load_dry.json   (tiny shape, gloo, seconds)

Every rank reports: load seconds, bytes read, peak CPU RSS (absolute and growth over the post-import baseline),
GPU allocated / reserved (now and peak) and the parameter bytes it holds. Only shardtune, torch, transformers and
bitsandbytes are needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import SHAPES, hf_config, write_config_dir  # noqa: E402  (one shape table for every bench)


# ------------------------------------------------------------------------------------------------ model dirs

def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `config` holds: persistent state, tied weights once."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, out = set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, tuple(t.shape)))
    return out


def write_random_checkpoint(out_dir: Path, config, dtype=None, shard_bytes: int = 2 << 30, seed: int = 0,
                            std: float = 0.02, device=None) -> dict:
    """Write a random checkpoint of `config` as safetensors shards + index, one shard in memory at a time.

    Values: norms 1, biases 0, the rest N(0, std), generated on `device` (a GPU makes 13B take seconds). Returns
    {bytes, files, seconds}."""
    import torch
    from safetensors.torch import save_file
    dtype = dtype or torch.bfloat16
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    esize = torch.empty((), dtype=dtype).element_size()
    groups, cur, cur_bytes = [], [], 0
    for name, shape in checkpoint_tensors(config):
        nb = math.prod(shape) * esize
        if cur and cur_bytes + nb > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nb
    if cur:
        groups.append(cur)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1 and "norm" in name:
                t = torch.ones(shape, dtype=dtype)
            elif name.endswith(".bias"):
                t = torch.zeros(shape, dtype=dtype)
            else:
                t = torch.randn(shape, generator=g, device=device).mul_(std).to(dtype).cpu()
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(out_dir)
    info = {"bytes": total, "files": len(groups), "seconds": round(time.perf_counter() - t0, 2),
            "dtype": str(dtype).replace("torch.", "")}
    (out_dir / "random_checkpoint.json").write_text(json.dumps(info))
    return info


def ensure_checkpoint(out_dir: Path, shape: str, dtype, shard_bytes: int) -> dict:
    """Reuse a checkpoint this script wrote earlier with the same shape and dtype; else write it."""
    out_dir = Path(out_dir)
    marker = out_dir / "random_checkpoint.json"
    want = {"shape": shape, "dtype": str(dtype).replace("torch.", "")}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all(info.get(k) == v for k, v in want.items()):
            return {**info, "reused": True}
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    info = write_random_checkpoint(out_dir, hf_config(shape), dtype, shard_bytes)
    info.update(want)
    marker.write_text(json.dumps(info))
    return {**info, "reused": False}


# ------------------------------------------------------------------------------------------------ measurement

def _gpu_stats(device) -> dict:
    import torch
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    return {"gpu_allocated_bytes": torch.cuda.memory_allocated(device),
            "gpu_reserved_bytes": torch.cuda.memory_reserved(device),
            "gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "gpu_name": torch.cuda.get_device_name(device)}


def _param_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total


def _warm_up(model_dir: Path) -> None:
    """Import everything a load touches (and resolve the model class) so import time and import memory stay out of
    the measurement."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    import shardtune.model.load  # noqa: F401
    import shardtune.model.stream  # noqa: F401
    import shardtune.parallel.fsdp  # noqa: F401
    import shardtune.parallel.placement  # noqa: F401
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(model_dir)))]


def _run_task(task: dict, device, dtype, world: int) -> dict:
    """One load on this rank; returns its measurements."""
    import gc
    import torch
    from shardtune.config import RunConfig
    cfg = RunConfig()
    cfg.train.method = "qlora"
    cfg.model.name_or_path = task["dir"]
    model_dir = Path(task["dir"])
    _warm_up(model_dir)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    from shardtune.model.memory_monitor import MemoryMonitor
    rss = MemoryMonitor(torch.device("cpu"), interval_s=0.002).start()  # host RSS only; _gpu_stats reads the GPU
    t0 = time.perf_counter()
    if task["kind"] == "reference":
        from shardtune.model.load import build_model
        model = build_model(cfg, model_dir, device, dtype)
        loader = None
    else:
        from shardtune.model.stream import build_streamed_model
        from shardtune.parallel.placement import fsdp_place
        shard = place = None
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from shardtune.parallel.fsdp import shard_model
            mesh = init_device_mesh(device.type, (world,))
            shard = lambda m: shard_model(m, cfg, mesh, dtype)  # noqa: E731
            place = fsdp_place()
        model = build_streamed_model(cfg, model_dir, device, dtype, place=place, shard=shard,
                                     random_init=task["kind"] == "random")
        loader = model.load_report.to_dict()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"task": task["kind"], "shape": task["shape"], "nproc": world, "load_seconds": round(seconds, 3),
           "rss_baseline_bytes": rss.baseline, "peak_rss_bytes": rss.stop(),
           "rss_growth_bytes": rss.peak - rss.baseline, **_gpu_stats(device), "param_bytes_local": _param_bytes(model), "loader": loader}
    # prove the loaded model runs: one short forward (gathers shards under FSDP)
    try:
        ids = torch.randint(0, 100, (1, 64), device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        out["forward_ok"] = bool(torch.isfinite(logits.float()).all().item())
        out.update({f"after_forward_{k}": v for k, v in _gpu_stats(device).items() if k.startswith("gpu_peak")})
    except Exception as e:  # report, do not hide: the load numbers above are still valid
        out["forward_ok"] = False
        out["forward_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def worker(args) -> None:
    """Runs inside each process (rank) of one launch: every task of this nproc, results gathered to rank 0."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    tasks = json.loads(args.worker)
    results = []
    for task in tasks:
        r = _run_task(task, device, dtype, world)
        r["rank"] = rank
        if world > 1:
            allr: list = [None] * world
            dist.all_gather_object(allr, r)
        else:
            allr = [r]
        results.append({"task": task["kind"], "shape": task["shape"], "nproc": world, "ranks": allr})
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still has work in flight (it aborted the process)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher

def _launch(tasks: list[dict], nproc: int, dry_run: bool, timeout: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as td:
        result = Path(td) / "result.json"
        me = [str(Path(__file__).resolve()), "--worker", json.dumps(tasks), "--result", str(result)]
        if dry_run:
            me.append("--dry-run")
        if nproc == 1:
            cmd = [sys.executable] + me
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + me
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"load bench worker (nproc={nproc}) failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(result.read_text())


def _fmt(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f}"


def print_table(report: dict) -> None:
    print(f"{'task':9} {'shape':12} {'n':>2} {'rank':>4} {'load s':>7} {'GB read':>8} {'RSS peak':>9} {'RSS +':>7} "
          f"{'GPU alloc':>9} {'GPU peak':>9} {'GPU rsvd':>9} {'params GB':>9} fwd")
    for run in report["runs"]:
        for r in run["ranks"]:
            rd = (r.get("loader") or {}).get("bytes_read")
            print(f"{run['task']:9} {run['shape']:12} {run['nproc']:>2} {r['rank']:>4} {r['load_seconds']:>7.1f} "
                  f"{_fmt(rd):>8} {_fmt(r['peak_rss_bytes']):>9} {_fmt(r['rss_growth_bytes']):>7} "
                  f"{_fmt(r.get('gpu_allocated_bytes')):>9} {_fmt(r.get('gpu_peak_allocated_bytes')):>9} "
                  f"{_fmt(r.get('gpu_reserved_bytes')):>9} {_fmt(r['param_bytes_local']):>9} {r.get('forward_ok')}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument("--mode", choices=["ckpt", "random", "both"], default="both")
    ap.add_argument("--shape", default="llama2-13b", choices=sorted(SHAPES), help="checkpoint shape (ckpt mode)")
    ap.add_argument("--nproc", default="1,2", help="GPU counts for the ckpt load, comma separated")
    ap.add_argument("--random-shape", default="llama2-70b", choices=sorted(SHAPES))
    ap.add_argument("--random-nproc", default="2", help="GPU counts for the random 4-bit build")
    ap.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "shardtune-load-bench"))
    ap.add_argument("--shard-gb", type=float, default=2.0, help="checkpoint shard size")
    ap.add_argument("--reference", action="store_true", help="also time from_pretrained + QLoRA on 1 GPU")
    ap.add_argument("--drop-caches", action="store_true", help="try to drop the page cache before each load (root)")
    ap.add_argument("--timeout", type=int, default=3000, help="seconds per launch")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU with gloo: checks the script only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if not args.out:
        ap.error("--out is required")

    import torch
    import transformers
    if args.dry_run:
        args.shape = args.random_shape = "tiny"
        args.ckpt_dir = os.path.join(tempfile.mkdtemp(prefix="shardtune-load-dry-"), "ckpt")
        args.shard_gb = 0.0002  # a few shards even for the tiny model: exercises the index path
    dtype = torch.float32 if args.dry_run or not torch.cuda.is_available() else torch.bfloat16
    report = {"bench": "load", "dry_run": args.dry_run, "argv": sys.argv[1:] if argv is None else list(argv),
              "host": {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "cpus": os.cpu_count(),
                       "gpus": torch.cuda.device_count() if not args.dry_run else 0},
              "runs": []}
    by_nproc: dict[int, list[dict]] = {}
    if args.mode in ("ckpt", "both"):
        ck = ensure_checkpoint(Path(args.ckpt_dir), args.shape, dtype, int(args.shard_gb * 2**30))
        report["checkpoint"] = {"dir": args.ckpt_dir, **ck}
        how = "reused" if ck["reused"] else f"written in {ck['seconds']} s"
        print(f"checkpoint {args.shape}: {ck['bytes'] / 1e9:.2f} GB in {ck['files']} file(s) ({how})", flush=True)
        for n in [int(x) for x in args.nproc.split(",") if x]:
            by_nproc.setdefault(n, []).append({"kind": "ckpt", "shape": args.shape, "dir": args.ckpt_dir})
        if args.reference:
            by_nproc.setdefault(1, []).insert(0, {"kind": "reference", "shape": args.shape, "dir": args.ckpt_dir})
    if args.mode in ("random", "both"):
        cdir = write_config_dir(args.random_shape, Path(tempfile.mkdtemp(prefix="shardtune-random-")) / "model")
        for n in [int(x) for x in args.random_nproc.split(",") if x]:
            by_nproc.setdefault(n, []).append({"kind": "random", "shape": args.random_shape, "dir": str(cdir)})
    for n in sorted(by_nproc):
        if args.drop_caches:
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3")
                report.setdefault("notes", []).append("page cache dropped before each launch")
            except OSError:
                report.setdefault("notes", []).append("could not drop the page cache (not root): loads may read "
                                                      "from the page cache")
        t0 = time.perf_counter()
        runs = _launch(by_nproc[n], n, args.dry_run, args.timeout)
        for r in runs:
            r["launch_seconds"] = round(time.perf_counter() - t0, 1)
        report["runs"] += runs
        print(f"nproc={n}: {', '.join(r['task'] for r in runs)} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
