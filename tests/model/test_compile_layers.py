"""train.compile's refusals (shardtune/model/compile_layers.py): each names what it skips and changes nothing."""

from __future__ import annotations

import torch
from torch import nn

from shardtune.model.compile_layers import compile_layers


class _Fake(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_cpu_sharded_and_fused_lora_run_eagerly_with_one_line():
    m = _Fake()
    assert compile_layers(m, torch.device("cpu"), "none") == "compile: train.compile needs CUDA; running eagerly"
    assert "parallel.strategy=fsdp" in compile_layers(m, torch.device("cuda"), "fsdp")
    line = compile_layers(m, torch.device("cuda"), "none", fused_lora=224)
    assert line.startswith("compile: not applied with train.fused_lora")
    assert not hasattr(m, "_compiled_call_impl") or m._compiled_call_impl is None
