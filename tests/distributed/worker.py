"""Runs a list of training jobs inside one torchrun launch (2 ranks, gloo, CPU) and writes what the tests check.

One launch serves many jobs because every process start re-imports torch, transformers, peft and deepspeed (seconds
each on a 2-core machine). Usage: python -m torch.distributed.run --nproc-per-node 2 worker.py spec.json
spec: {"model": dir, "data": file, "root": dir, "results": file, "jobs": [{"name", "overrides": {...},
       "copy_from": name (start from a copy of that job's output dir, for resume), "probes": ["imbalance", "meta"]}]}
Rank 0 writes results: {name: {"losses", "grad_norms", "q4" [[weight, const] per rank], "param_bytes" [per rank],
"out", "stdout", "error", "imbalance_error", ...}}.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for `support`

from shardtune.config import load_config  # noqa: E402
from shardtune.errors import Stopped  # noqa: E402
from shardtune.parallel import dist_info_from_env  # noqa: E402
from shardtune.parallel.launch import init_distributed  # noqa: E402
from support import run_overrides  # noqa: E402


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def all_gather_ints(values: list[int]) -> list[list[int]]:
    t = torch.tensor(values, dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.tolist() for x in out]


def grad_norms(out: Path) -> list[float]:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def probe_imbalance(engine) -> str | None:
    """Pretend rank 1 holds 3x its parameter bytes; the check must raise on every rank."""
    from shardtune.errors import ImbalanceError
    from shardtune.parallel.balance import check_balance
    real = engine.local_param_bytes
    if engine.dist.rank == 1:
        engine.local_param_bytes = lambda: 3 * real()
    try:
        check_balance(engine, 0.15, out=lambda *_: None)
        return None
    except ImbalanceError as e:
        return str(e)
    finally:
        engine.local_param_bytes = real


def probe_meta(cfg, model_dir: Path) -> dict:
    """Build the QLoRA model on the meta device, shard it with `shard_model`, materialize only the local shards and
    fill them from the checkpoint; the loss on a batch must equal the eagerly loaded model's."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from shardtune.model.load import add_lora, build_model, quantization_config
    from shardtune.parallel.fsdp import copy_full_into, shard_model
    from shardtune.parallel.quant4 import ShardedLinear4bit, quantize_into

    dtype, dev = torch.float32, torch.device("cpu")
    qc = quantization_config(cfg, dtype)
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    base = replace_with_bnb_linear(base, modules_to_not_convert=["lm_head"], quantization_config=qc)
    meta = add_lora(base, cfg)
    shard_model(meta, cfg, None, dtype)
    on_meta = all(p.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device=dev)
    full = load_file(str(model_dir / "model.safetensors"))
    mods = dict(meta.named_modules())
    params = dict(meta.named_parameters())
    with torch.no_grad():
        for name, m in mods.items():
            if isinstance(m, ShardedLinear4bit):
                key = name.replace("base_model.model.", "", 1).replace(".base_layer", "") + ".weight"
                packed, blob = quantize_into(m, full[key])
                copy_full_into(m.weight, packed)
                copy_full_into(m.quant_blob, blob)
        for name, p in params.items():
            if "lora_" in name or ".base_layer." in name or "quant_blob" in name:
                continue
            key = name.replace("base_model.model.", "", 1)
            if key.endswith(".weight") and key in full:
                copy_full_into(p, full[key])
        eager = build_model(cfg, model_dir, dev, dtype)
        esd = {n: t for n, t in eager.named_parameters() if "lora_" in n}
        for name, p in params.items():
            if name in esd:
                copy_full_into(p, esd[name].detach())
        for b_name, b in meta.named_buffers():  # rotary inv_freq: recompute from the eager model
            eb = dict(eager.named_buffers()).get(b_name)
            if eb is not None:
                b.copy_(eb)
    ids = torch.arange(3, 40).reshape(1, -1) % 200 + 5
    with torch.no_grad():
        want = eager(input_ids=ids).logits.float()
        got = meta(input_ids=ids).logits.float()
    q4 = sum(m.weight.to_local().numel() for m in meta.modules() if isinstance(m, ShardedLinear4bit))
    q4_eager = sum(m.weight.numel() for m in eager.modules() if isinstance(m, __import__("bitsandbytes").nn.Linear4bit))
    return {"was_meta": on_meta, "max_logit_diff": float((want - got).abs().max()), "q4_local": q4, "q4_full": q4_eager}


def signal_during_step(trainer, rank: int, step: int, signum: str = "SIGTERM") -> None:
    """Rank `rank` gets `signum` while its optimizer step `step` (1-based) runs, as from a scheduler; the other rank
    gets nothing and must stop at the same step."""
    import signal
    if dist.get_rank() != rank:
        return
    real, calls = trainer.engine.step, []

    def step_and_signal(*a, **kw):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), getattr(signal, signum))
        return real(*a, **kw)
    trainer.engine.step = step_and_signal


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    info = dist_info_from_env()
    init_distributed(info, torch.device("cpu"), timeout_min=3)
    rank = info.rank
    torch.set_num_threads(1)
    from shardtune.train.loop import Trainer
    from shardtune.parallel.quant4 import quant4_bytes

    root = Path(spec["root"])
    results: dict = {}
    for job in spec["jobs"]:
        name = job["name"]
        out = root / job.get("same_dir", name)  # a resume continues a stopped job's own output dir
        res: dict = {"out": str(out)}
        buf = io.StringIO()
        t0 = time.perf_counter()
        try:
            if job.get("copy_from") and rank == 0:
                src = root / job["copy_from"]
                shutil.copytree(src, out, dirs_exist_ok=True)
                for stale in ("metrics.jsonl", "adapter", "shardtune_run.json",
                              f"checkpoints/step-{int(job['overrides']['train.max_steps']):06d}"):
                    p = out / stale  # what the source run wrote after the crash this resume stands in for
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            dist.barrier()
            ov = run_overrides(Path(spec["model"]), Path(spec["data"]), out, **job["overrides"])
            cfg = load_config(None, ov)
            with contextlib.redirect_stdout(Tee(sys.stdout, buf) if rank == 0 else io.StringIO()):
                tr = Trainer(cfg, out=print if rank == 0 else (lambda *_: None))
                tr.setup()
                model = tr.engine.unwrapped()
                res["q4"] = all_gather_ints(list(quant4_bytes(model)))
                res["param_bytes"] = [v[0] for v in all_gather_ints([tr.engine.local_param_bytes()])]
                res["fsdp_layers_per_unit"] = getattr(model, "fsdp_layers_per_unit", None)
                if "imbalance" in job.get("probes", []):
                    res["imbalance_error"] = probe_imbalance(tr.engine)
                if job.get("signal_at"):
                    signal_during_step(tr, **job["signal_at"])
                try:
                    r = tr.run()
                except Stopped as e:
                    res["stopped"] = str(e)
                    raise
            res["losses"] = r.losses
            res["eval_losses"] = [list(e) for e in r.eval_losses]
            res["grad_norms"] = grad_norms(out)
            if "meta" in job.get("probes", []):
                res["meta"] = probe_meta(cfg, Path(spec["model"]))
        except Stopped:
            pass
        except Exception:
            res["error"] = traceback.format_exc()
            print(f"[rank {rank}] job {name} failed:\n{res['error']}", file=sys.stderr, flush=True)
        res["stdout"] = buf.getvalue()
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = res
        dist.barrier()
    if rank == 0:
        Path(spec["results"]).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
