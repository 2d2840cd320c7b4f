"""With FSDP CPU offload, parameters that were not streamed (LoRA weights) must follow the streamed ones."""

from __future__ import annotations

import torch

from shardtune.model.stream import _rehome_params, fsdp_place


def test_rehome_moves_only_params_elsewhere():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    # already "home" (the meta device stands in for the offload device)
    m[1].weight = torch.nn.Parameter(torch.empty(1, 2, device="meta"))
    moved = _rehome_params(m, torch.device("meta"))
    assert moved == 3  # weight+bias of the first layer, bias of the second
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m[0].weight.requires_grad


def test_fsdp_place_records_its_device():
    assert fsdp_place(torch.device("cpu")).device == torch.device("cpu")
    assert fsdp_place().device is None
