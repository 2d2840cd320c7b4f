"""bitsandbytes' CPU fast path stays off on shardtune's 4-bit models: an eval forward under no_grad neither fails on a
layer whose out_features is not a multiple of 32 nor rewrites the 4-bit weights, and training after an eval pass still
backpropagates through the base (shardtune.model.bnb_cpu)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardtune.config import RunConfig
from shardtune.model.bnb_cpu import disable_cpu_weight_packing

bnb = pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")
PROBE = (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % 400


@pytest.fixture(autouse=True)
def _needs_the_switch():
    if not hasattr(bnb.nn.Linear4bit(8, 8), "support_avx512bf16_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU weight-packing fast path to turn off")


def _qlora_cfg(model_dir) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.train.method = "qlora"
    return cfg


def _linear4bit(in_f: int, out_f: int) -> nn.Module:
    torch.manual_seed(0)
    dense = torch.randn(out_f, in_f) / in_f ** 0.5
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4", quant_storage=torch.float32)
    m.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.float32, module=m)
    return m.to(CPU)  # quantizes


def _snapshot(model: nn.Module) -> dict:
    """Every 4-bit layer's stored bytes and quantization constants, as they are on the module (not via state_dict,
    which converts a packed weight back)."""
    snap = {}
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            snap[n] = (m.weight.data.clone(), qs.absmax.clone(), qs.dtype, qs.nested,
                       getattr(qs, "packing_format_for_cpu", False))
    return snap


def _assert_same(before: dict, after: dict):
    assert list(before) == list(after)
    for n in before:
        (w0, a0, d0, nest0, p0), (w1, a1, d1, nest1, p1) = before[n], after[n]
        assert (d1, nest1, p1) == (d0, nest0, p0), n
        assert w1.shape == w0.shape and torch.equal(w1.view(torch.uint8), w0.view(torch.uint8)), n
        assert a1.dtype == a0.dtype and torch.equal(a1, a0), n


def test_eval_forward_of_a_loaded_4bit_model_matches_train_mode_and_keeps_the_weights(tiny_model):
    from shardtune.model.load import load_base_model

    model_dir = tiny_model("llama")
    model = load_base_model(_qlora_cfg(model_dir), model_dir, CPU, torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.out_features % 32 for m in quantized)  # the case bitsandbytes' packing asserts on
    assert all(m.support_avx512bf16_for_cpu is False for m in quantized)
    before = _snapshot(model)
    model.train()
    with torch.no_grad():
        want = model(input_ids=PROBE).logits
    model.eval()
    with torch.no_grad():
        got = model(input_ids=PROBE).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    _assert_same(before, _snapshot(model))


def test_streamed_4bit_model_has_the_packing_off(tiny_model):
    from shardtune.model.stream import build_streamed_model

    model_dir = tiny_model("llama")
    model = build_streamed_model(_qlora_cfg(model_dir), model_dir, CPU, torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.support_avx512bf16_for_cpu is False for m in quantized)
    before = _snapshot(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=PROBE)
    _assert_same(before, _snapshot(model))


def test_training_after_an_eval_pass_still_backpropagates_through_the_4bit_layer():
    # 64 x 64 is a shape the packing accepts, so without the switch it happens silently; the flag is forced on so
    # the test means the same on a CPU without AVX512-BF16
    layer = _linear4bit(64, 64)
    layer.support_avx512bf16_for_cpu = True
    model = nn.Sequential(layer)
    assert disable_cpu_weight_packing(model) == 1 and layer.support_avx512bf16_for_cpu is False
    x = torch.randn(3, 64)

    def train_step():
        model.train()
        xr = x.clone().requires_grad_(True)
        y = model(xr)
        y.square().sum().backward()
        return y.detach(), xr.grad

    y0, g0 = train_step()
    before = _snapshot(model)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    torch.testing.assert_close(y_eval, y0, rtol=0, atol=1e-6)
    y1, g1 = train_step()
    assert g1 is not None  # bitsandbytes' packed CPU kernel has no autograd: the gradient would stop here
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-6)
    _assert_same(before, _snapshot(model))


def test_models_without_4bit_layers_are_left_alone():
    assert disable_cpu_weight_packing(nn.Sequential(nn.Linear(4, 4))) == 0
