"""Subprocess body for the memory tests: load a checkpoint with the streamed loader (one process, or one rank of a
torchrun launch with FSDP2) and write what it measured to a JSON file.

Run fresh so that the parent's imports and allocations do not count: the baseline is taken after every import, and
the peak is the larger of psutil sampled every 2 ms and the kernel's VmHWM (reset at the baseline).

usage: python load_worker.py MODEL_DIR OUT_JSON [--tiny TINY_DIR]
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shardtune.config import RunConfig  # noqa: E402
import peft  # noqa: E402,F401 - imported here so import memory is in the baseline
from shardtune.model.load import build_model  # noqa: E402,F401
from shardtune.model.load_report import gather_load_reports  # noqa: E402
from shardtune.model.memory_monitor import MemoryMonitor  # noqa: E402
from shardtune.model.stream import build_streamed_model  # noqa: E402
from shardtune.parallel.placement import fsdp_place  # noqa: E402


def digests(model) -> dict:
    """sha1 of this rank's bytes of every frozen base tensor, keyed by checkpoint-style name."""
    out = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, p in base.named_parameters():
        if p.requires_grad or "lora_" in name:
            continue
        t = p.to_local() if hasattr(p, "to_local") else p
        t = t.detach().contiguous()
        out[name.replace(".base_layer", "")] = {
            "sha1": hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else "empty",
            "shape": list(t.shape), "bytes": t.numel() * t.element_size()}
    return out


def config(model_dir: str) -> RunConfig:
    cfg = RunConfig()
    cfg.train.method = "qlora"
    cfg.model.name_or_path = model_dir
    return cfg


def main() -> None:
    model_dir, out_path = sys.argv[1], Path(sys.argv[2])
    tiny = sys.argv[sys.argv.index("--tiny") + 1] if "--tiny" in sys.argv else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = place = None
    cpu = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from shardtune.parallel.fsdp import shard_model
        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        shard = lambda m: shard_model(m, config(model_dir), mesh, torch.float32)  # noqa: E731
        place = fsdp_place()
    rank = int(os.environ.get("RANK", "0"))
    # resolve the model class now: its import is not part of loading
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]

    gc.collect()
    peak = MemoryMonitor(cpu, interval_s=0.002).start()
    torch.manual_seed(0)
    model = build_streamed_model(config(model_dir), Path(model_dir), cpu, torch.float32, place=place, shard=shard)
    result = {"rank": rank, "world_size": world, "baseline_rss": peak.baseline, "peak_rss": peak.stop(),
              "report": model.load_report.to_dict(), "digests": digests(model),
              "gathered": [r.format() for r in gather_load_reports(model.load_report)]}
    del model
    gc.collect()
    if tiny:
        # the sharded tiny model must compute what the reference from_pretrained model computes
        torch.manual_seed(0)
        if world > 1:
            shard = lambda m: shard_model(m, config(tiny), mesh, torch.float32)  # noqa: E731
        m = build_streamed_model(config(tiny), Path(tiny), cpu, torch.float32, place=place, shard=shard)
        ids = torch.arange(3, 3 + 2 * 24).reshape(2, 24) % 300
        trainable = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                     for n, p in m.named_parameters() if p.requires_grad}
        m.eval()  # no LoRA dropout; autograd still on: the adapters must get the reference gradients
        logits = m(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
                 for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}
        if rank == 0:
            torch.save({"ids": ids, "logits": logits.detach(), "trainable": trainable, "grads": grads},
                       str(out_path) + ".tiny.pt")
    Path(f"{out_path}.rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
