"""How a sharding engine steers the streamed loader without model/ importing it: a plain place function, or a
model.materialize.Placement whose hooks (which 4-bit layers keep their constants as a parameter, what to do after
the load) the loader calls. The FSDP implementation is tested in tests/parallel and tests/distributed."""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from shardtune.config import RunConfig
from shardtune.model.materialize import Placement
from shardtune.model.stream import build_streamed_model

CPU = torch.device("cpu")


def _cfg(model_dir):
    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.train.method = "qlora"
    return cfg


def _state(model) -> dict:
    return {k: v.detach().contiguous().view(torch.uint8).clone() for k, v in model.state_dict().items()}


def _build(model_dir, place=None):
    torch.manual_seed(0)
    return build_streamed_model(_cfg(model_dir), model_dir, CPU, torch.float32, place=place)


def test_plain_function_and_placement_subclass_both_steer_the_load(tiny_model):
    d = tiny_model("llama")
    ref = _state(_build(d))
    seen, quant_states = [], []

    def keep(name, module, param_name, value, quant_state):
        seen.append(name)
        quant_states.append(quant_state is not None)
        return value

    with_fn = _build(d, keep)
    assert _state(with_fn).keys() == ref.keys() and all(torch.equal(_state(with_fn)[k], ref[k]) for k in ref)
    assert with_fn.load_report.tensors == len(seen) > 0
    n4 = sum(type(m) is bnb.nn.Linear4bit for m in with_fn.modules())
    assert sum(quant_states) == n4 > 0  # each 4-bit weight comes with its QuantState, nothing else does

    class Recording(Placement):
        def __init__(self):
            self.asked, self.finished = [], []

        def constants_param(self, module):
            self.asked.append(type(module).__name__)
            return None

        def after_load(self, model, load_device):
            self.finished.append((model, load_device))

    rec = Recording()
    model = _build(d, rec)
    assert all(torch.equal(_state(model)[k], ref[k]) for k in ref)
    assert set(rec.asked) == {"Linear4bit"} and len(rec.asked) == sum(quant_states)  # asked once per 4-bit weight
    assert rec.finished == [(model, CPU)]


def test_a_placement_that_keeps_constants_apart_gets_them_packed_and_placed(tiny_model):
    d = tiny_model("llama")
    packed = []

    class Apart(Placement):
        def constants_param(self, module):
            # stand in for an engine's layer: a frozen parameter to receive the constants
            module.register_parameter("consts", torch.nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
            return "consts", lambda qs: packed.append(qs) or qs.absmax.clone()

    model = _build(d, Apart())
    layers = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    assert layers and len(packed) == len(layers)
    for m in layers:
        assert m.consts.device == CPU and m.consts.numel() > 0
        assert type(m.weight) is torch.nn.Parameter  # no Params4bit: the constants live in `consts`
        assert getattr(m, "quant_state", None) is None
