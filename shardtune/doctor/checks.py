"""What a doctor check is (OK / WARN / FAIL with a one-line fix) and what a config needs of the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Needs:
    """What a config asks of the environment (all False/None without a config)."""
    quantized: bool = False           # qlora or int8 base (bitsandbytes)
    method: Optional[str] = None
    strategy: Optional[str] = None    # none | ddp | fsdp | deepspeed | auto
    offload: bool = False
    precision: str = "auto"
    device: str = "auto"
    cuda: bool = False                # a CUDA GPU is visible
    output_dir: str = "."
    model: Optional[str] = None
    data: Optional[str] = None
    deepspeed_config: Optional[str] = None
    quant_type: str = "nf4"

    @classmethod
    def from_config(cls, cfg, cuda: bool) -> "Needs":
        if cfg is None:
            return cls(cuda=cuda)
        from shardtune.resolve import resolve_strategy
        p = cfg.parallel
        # doctor runs as one process; the strategy a launch of more ranks resolves to can only differ for auto
        strategy = resolve_strategy(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return cls(quantized=cfg.train.method in ("qlora", "int8"), method=cfg.train.method, strategy=strategy,
                   offload=p.offload_param or p.offload_optimizer, precision=cfg.train.precision,
                   device=cfg.train.device, cuda=cuda, output_dir=cfg.output.dir, model=cfg.model.name_or_path,
                   data=cfg.data.path, deepspeed_config=p.deepspeed_config, quant_type=cfg.quant.quant_type)
