"""FSDP placement of streamed weights (shardtune.parallel.placement): what it tells the loader through the Placement
protocol. The sharded load itself is covered by tests/model/test_stream_memory.py and tests/distributed."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from shardtune.model.materialize import Placement
from shardtune.parallel.placement import FsdpPlacement, fsdp_place, rehome_params


def test_rehome_moves_only_params_elsewhere():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    # already "home" (the meta device stands in for the offload device)
    m[1].weight = torch.nn.Parameter(torch.empty(1, 2, device="meta"))
    moved = rehome_params(m, torch.device("meta"))
    assert moved == 3  # weight+bias of the first layer, bias of the second
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m[0].weight.requires_grad


def test_fsdp_place_records_its_device():
    assert fsdp_place(torch.device("cpu")).device == torch.device("cpu")
    assert fsdp_place().device is None
    assert isinstance(fsdp_place(), Placement)


@pytest.mark.parametrize("home, moved", [(None, False), ("cpu", False), ("meta", True)])
def test_after_load_moves_unstreamed_params_only_to_another_home(home, moved):
    # With FSDP CPU offload, parameters that were not streamed (LoRA weights) must follow the streamed ones.
    m = torch.nn.Linear(3, 2)
    FsdpPlacement(torch.device(home) if home else None).after_load(m, torch.device("cpu"))
    assert (m.weight.device.type == "meta") is moved


def test_only_the_shardable_4bit_layer_keeps_its_constants_as_a_parameter():
    from shardtune.parallel.quant4 import convert_linear4bit
    with torch.device("meta"):
        stock = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                  quant_storage=torch.float32)
    stock.weight = bnb.nn.Params4bit(torch.empty(32 * 64 // 8, 1, dtype=torch.float32, device="meta"),
                                     requires_grad=False, quant_type="nf4", quant_storage=torch.float32, module=stock,
                                     bnb_quantized=True)
    place = FsdpPlacement()
    assert place.constants_param(stock) is None and place.constants_param(torch.nn.Linear(2, 2)) is None
    assert Placement().constants_param(stock) is None
    sharded = convert_linear4bit(stock, torch.float32)
    attr, pack = place.constants_param(sharded)
    assert attr == "quant_blob" and attr in sharded._parameters
    # the packer is the layer's own: a real QuantState packs to a blob the layer's layout reads back
    real = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                             quant_storage=torch.float32)
    real.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4",
                                    quant_storage=torch.float32, module=real)
    real = real.to("cpu")
    blob = pack(real.weight.quant_state)
    assert blob.numel() == sharded.layout.blob_numel
