"""GPUs, the live bitsandbytes 4-bit probe, DeepSpeed and the distributed backends."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shardtune.doctor.checks import FAIL, OK, WARN, Check, Needs
from shardtune.hardware import GiB

# ---------------------------------------------------------------- GPUs


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total_bytes: int
    free_bytes: Optional[int] = None

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)  # Ampere and newer; V100 (7.0) and T4 (7.5) have no bf16 tensor cores


def detect_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, _ = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free = None
        gpus.append(GpuInfo(i, p.name, (p.major, p.minor), p.total_memory, free))
    return gpus


def check_gpus(gpus: list[GpuInfo], needs: Needs) -> list[Check]:
    from shardtune.resolve import precision_refusal
    if not gpus:
        if needs.device == "cuda":
            return [Check("cuda", FAIL, "train.device=cuda but torch sees no CUDA GPU",
                          "install the CUDA build of torch and check nvidia-smi / CUDA_VISIBLE_DEVICES")]
        checks = [Check("cuda", WARN, "no CUDA GPU visible: training runs on the CPU (fine for the quickstart, "
                                      "slow for real models)",
                        "if this machine has a GPU: install torch's CUDA build (pytorch.org/get-started) and check "
                        "nvidia-smi")]
        bad = precision_refusal(needs.precision, on_gpu=False)
        if bad:
            checks.append(Check("precision", FAIL, *bad))
        return checks
    checks = []
    for g in gpus:
        free = f", {g.free_bytes / GiB:.1f} GiB free" if g.free_bytes is not None else ""
        checks.append(Check(f"cuda:{g.index}", OK, f"{g.name}, {g.total_bytes / GiB:.1f} GiB{free}, compute "
                                                   f"capability {g.capability[0]}.{g.capability[1]}, "
                                                   f"bf16 {'yes' if g.bf16 else 'no'}"))
    names = {g.name for g in gpus}
    if len(names) > 1:
        checks.append(Check("gpu mix", WARN, f"different GPUs: {', '.join(sorted(names))}; sharding is balanced by "
                                              f"parameter count, so the smallest GPU sets the limit",
                            "set CUDA_VISIBLE_DEVICES to one kind of GPU"))
    no_bf16 = [g for g in gpus if not g.bf16]
    if no_bf16:
        which = ", ".join(sorted({g.name for g in no_bf16}))
        bad = precision_refusal(needs.precision, on_gpu=True, gpu_bf16=False, gpu_name=which)
        if bad:
            checks.append(Check("precision", FAIL, *bad))
        else:
            checks.append(Check("precision", OK, f"{which}: no bf16; precision {needs.precision} -> fp16 with loss "
                                                 f"scaling" if needs.precision == "auto" else
                                f"{which}: no bf16; train.precision={needs.precision}"))
    return checks


# ---------------------------------------------------------------- bitsandbytes, deepspeed, distributed


def check_bnb_4bit(device: str, needs: Needs) -> Check:
    """Quantize a small Linear to 4 bits on `device` and run it: proves the kernels load and compute correctly."""
    status_on_fail = FAIL if needs.quantized else WARN
    name = f"bitsandbytes 4-bit on {device}"
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
        import torch
    except Exception as e:
        return Check(name, status_on_fail, f"cannot import bitsandbytes ({type(e).__name__}: {str(e)[:120]})",
                     "pip install 'bitsandbytes>=0.46' (built for this CUDA / CPU)")
    try:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 64, generator=gen) * 0.05
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type=needs.quant_type)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=needs.quant_type)
        layer = layer.to(device)
        x = torch.randn(4, 64, generator=gen).to(device=device, dtype=dtype)
        with torch.no_grad():
            y = layer(x).float()
            deq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            ref = x.float() @ deq.t()
            full = x.float() @ w.to(device).t()
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite output")
        err_kernel = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        err_quant = (ref - full).norm().item() / max(full.norm().item(), 1e-6)
        if err_kernel > 0.02 or err_quant > 0.2:
            raise RuntimeError(f"wrong result (kernel error {err_kernel:.3f}, quantization error {err_quant:.3f})")
    except Exception as e:
        return Check(name, status_on_fail, f"a {needs.quant_type} Linear4bit failed: {type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                     "reinstall bitsandbytes for this torch/CUDA (pip install -U bitsandbytes), or use "
                     "train.method=lora")
    return Check(name, OK, f"{needs.quant_type} Linear4bit forward matches its dequantized weight "
                           f"(quantization error {err_quant:.1%})")


def check_deepspeed(needs: Needs, versions: dict) -> list[Check]:
    if needs.strategy != "deepspeed":
        return []
    checks = []
    if versions.get("deepspeed") is not None:
        if not needs.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # otherwise deepspeed probes for CUDA and warns
        try:
            import deepspeed  # noqa: F401
            checks.append(Check("deepspeed import", OK, f"deepspeed {deepspeed.__version__} imports"))
        except Exception as e:
            checks.append(Check("deepspeed import", FAIL, f"import deepspeed failed: {type(e).__name__}: "
                                                          f"{str(e).splitlines()[0][:160] if str(e) else ''}",
                                "DS_BUILD_OPS=0 pip install --no-build-isolation --force-reinstall deepspeed "
                                "(built against the installed torch)"))
    if needs.deepspeed_config:
        p = Path(needs.deepspeed_config)
        try:
            json.loads(p.read_text())
            checks.append(Check("deepspeed config", OK, str(p)))
        except OSError:
            checks.append(Check("deepspeed config", FAIL, f"parallel.deepspeed_config '{p}' not found",
                                "pass the path of your ds_config.json"))
        except json.JSONDecodeError as e:
            checks.append(Check("deepspeed config", FAIL, f"'{p}' is not valid JSON (line {e.lineno}: {e.msg})",
                                "fix the JSON"))
    return checks


def check_distributed(needs: Needs, n_gpus: int) -> list[Check]:
    import torch.distributed as dist

    if not dist.is_available():
        status = FAIL if needs.strategy in ("ddp", "fsdp", "deepspeed") else WARN
        return [Check("torch.distributed", status, "this torch build has no torch.distributed",
                      "install an official torch wheel")]
    nccl, gloo = dist.is_nccl_available(), dist.is_gloo_available()
    detail = f"nccl {'yes' if nccl else 'no'}, gloo {'yes' if gloo else 'no'}"
    multi = needs.strategy in ("ddp", "fsdp", "deepspeed")
    if n_gpus and not nccl:
        return [Check("distributed backends", FAIL if multi else WARN, detail + " (GPUs need NCCL for several "
                                                                              "processes)",
                      "install the CUDA build of torch, which bundles NCCL")]
    if not n_gpus and not gloo:
        return [Check("distributed backends", FAIL if multi else WARN, detail + " (CPU ranks need gloo)",
                      "install an official torch wheel (gloo is built in)")]
    if n_gpus and nccl:
        try:
            import torch.cuda.nccl as tnccl
            detail += f" (NCCL {'.'.join(map(str, tnccl.version()))})"
        except Exception:
            pass
    return [Check("distributed backends", OK, detail)]
