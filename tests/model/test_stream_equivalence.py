"""The streamed loader builds the same model as the from_pretrained path (shardtune.model.load.build_model): same
module types and names, same dtypes and requires_grad, bit-identical state (packed 4-bit data, absmax and
double-quant constants, int8 codes, full-precision weights, LoRA initialisation for the same seed), same buffers,
same logits. Plus the reader's edge cases: tied embeddings, sharded index, prefix-less keys, missing or mismatched
weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shardtune.config import RunConfig
from shardtune.errors import ModelError
from shardtune.model.checkpoint import iter_checkpoint, list_checkpoint
from shardtune.model.load import build_model
from shardtune.model.random_weights import random_entries
from shardtune.model.skeleton import build_skeleton
from shardtune.model.stream import build_streamed_model

CPU = torch.device("cpu")
PROBE = (torch.arange(2 * 20).reshape(2, 20) * 7 + 3) % 400


def _cfg(model_dir, method, checkpointing=False, **lora):
    cfg = RunConfig()
    cfg.model.name_or_path = str(model_dir)
    cfg.train.method = method
    cfg.train.gradient_checkpointing = checkpointing
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return cfg


def _bits(t: torch.Tensor) -> torch.Tensor:
    # bitwise: packed 4-bit bytes viewed as float can be NaN, and NaN != NaN
    return t.detach().contiguous().view(torch.uint8)


def _unwrap(m):
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def _both(model_dir, method, dtype=torch.float32, **kw):
    cfg = _cfg(model_dir, method, **kw)
    torch.manual_seed(0)
    ref = build_model(cfg, model_dir, CPU, dtype)
    torch.manual_seed(0)
    got = build_streamed_model(cfg, model_dir, CPU, dtype)
    return ref, got


def assert_same_model(ref, got):
    assert [(n, type(m)) for n, m in ref.named_modules()] == [(n, type(m)) for n, m in got.named_modules()]
    rp, gp = dict(ref.named_parameters()), dict(got.named_parameters())
    assert list(rp) == list(gp)
    for n in rp:
        assert type(rp[n]) is type(gp[n]) and rp[n].dtype == gp[n].dtype, n
        assert rp[n].requires_grad == gp[n].requires_grad, n
    rs, gs = ref.state_dict(), got.state_dict()  # includes bnb's quant state (absmax, quant_map, nested_*, packed dict)
    assert list(rs) == list(gs)
    for k in rs:
        assert rs[k].dtype == gs[k].dtype and rs[k].shape == gs[k].shape, k
        assert torch.equal(_bits(rs[k]), _bits(gs[k])), f"{k} differs"
    rb, gb = dict(ref.named_buffers()), dict(got.named_buffers())  # non-persistent ones (rotary) are not in state_dict
    assert list(rb) == list(gb)
    for k in rb:
        assert rb[k].dtype == gb[k].dtype and torch.equal(rb[k], gb[k]), k


def assert_same_dequantized(ref, got):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    n = 0
    for (name, a), (_, b) in zip(_unwrap(ref).named_modules(), _unwrap(got).named_modules()):
        if isinstance(a, bnb.nn.Linear4bit):
            assert a.weight.quant_state is not None and b.weight.quant_state is not None
            assert torch.equal(_bits(a.weight.quant_state.absmax), _bits(b.weight.quant_state.absmax)), name
            assert torch.equal(F.dequantize_4bit(a.weight.data, a.weight.quant_state),
                               F.dequantize_4bit(b.weight.data, b.weight.quant_state)), name
            assert b.quant_state is b.weight.quant_state
            n += 1
        elif isinstance(a, bnb.nn.Linear8bitLt):
            assert torch.equal(a.weight.data, b.weight.data) and torch.equal(a.weight.SCB, b.weight.SCB), name
            n += 1
    assert n > 0


def assert_same_logits(ref, got):
    ref.eval(), got.eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=PROBE).logits, got(input_ids=PROBE).logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_qlora_is_bit_exact(tiny_model, arch):
    ref, got = _both(tiny_model(arch), "qlora")
    assert_same_model(ref, got)
    assert_same_dequantized(ref, got)
    assert _unwrap(got).is_loaded_in_4bit and _unwrap(got).config.quantization_config.to_dict() == \
        _unwrap(ref).config.quantization_config.to_dict()
    assert_same_logits(ref, got)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_qlora_bf16_storage_is_bit_exact(tiny_model, arch):
    """bf16 compute/storage (the GPU setting): 4 values per storage element, bf16 norms and biases (qwen2)."""
    ref, got = _both(tiny_model(arch), "qlora", torch.bfloat16)
    assert_same_model(ref, got)
    assert_same_dequantized(ref, got)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lora_weights_equal(tiny_model, arch):
    ref, got = _both(tiny_model(arch), "lora", checkpointing=arch == "llama")
    assert_same_model(ref, got)
    assert_same_logits(ref, got)
    assert _unwrap(got).is_gradient_checkpointing == _unwrap(ref).is_gradient_checkpointing == (arch == "llama")
    line = got.load_report.format()
    assert line.startswith("load rank 0/1:") and "GB read" in line and "peak CPU RSS" in line and "\n" not in line


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied head, the copy is filled from the embedding
def test_lora_bf16_and_modules_to_save(tiny_model, arch):
    ref, got = _both(tiny_model(arch), "lora", torch.bfloat16, modules_to_save=["lm_head"])
    assert_same_model(ref, got)
    copy = dict(got.named_parameters())["base_model.model.lm_head.modules_to_save.default.weight"]
    assert copy.requires_grad and copy.dtype == torch.float32 and copy.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_weights_equal(tiny_model, arch):
    ref, got = _both(tiny_model(arch), "full")
    assert_same_model(ref, got)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in got.parameters())
    assert_same_logits(ref, got)


def test_int8_is_bit_exact(tiny_model):
    """bitsandbytes LLM.int8 runs on the CPU (bitsandbytes >= 0.46), so this is checked here, not skipped."""
    ref, got = _both(tiny_model("llama"), "int8")
    assert_same_model(ref, got)
    assert_same_dequantized(ref, got)
    assert_same_logits(ref, got)


def test_tied_embeddings_filled_once(tiny_model):
    d = tiny_model("qwen2")
    assert "lm_head.weight" not in {e.key for e in list_checkpoint(d)}  # the checkpoint stores the tied weight once
    _, got = _both(d, "qlora")
    base = _unwrap(got)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert type(base.lm_head) is torch.nn.Linear  # tied: never quantized
    assert got.load_report.skipped_keys == []


def test_skeleton_is_meta_with_packed_4bit_shapes(tiny_model):
    import bitsandbytes as bnb
    m = build_skeleton(_cfg(tiny_model("llama"), "qlora"), tiny_model("llama"), torch.float32)
    assert all(p.is_meta for p in m.parameters())
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and tuple(q.weight.shape) == (64 * 64 // 8, 1)
    assert type(m.lm_head) is torch.nn.Linear


def test_iter_checkpoint_matches_safetensors(tiny_model):
    from safetensors.torch import load_file
    d = tiny_model("llama")
    ref = load_file(str(d / "model.safetensors"))
    got = dict(iter_checkpoint(d))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _resave(src, dst, rename=lambda k: k, drop=(), shard_every=None, edit_config=None):
    """Copy a tiny model dir with its checkpoint rewritten (keys renamed/dropped, split into shards)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    sd = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items() if k not in drop}
    keys = list(sd)
    groups = [keys[i:i + shard_every] for i in range(0, len(keys), shard_every)] if shard_every else [keys]
    wm = {}
    for i, g in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if shard_every else "model.safetensors"
        save_file({k: sd[k].contiguous() for k in g}, str(dst / name), metadata={"format": "pt"})
        wm.update({k: name for k in g})
    if shard_every:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if edit_config:
        c = json.loads((dst / "config.json").read_text())
        c.update(edit_config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_sharded_index_and_prefixless_keys_load_like_from_pretrained(tiny_model, tmp_path):
    """Keys saved without the base_model_prefix ('layers.0...' instead of 'model.layers.0...') across several
    shards: both paths add the prefix back and agree bit for bit."""
    d = _resave(tiny_model("llama"), tmp_path / "m", rename=lambda k: k.removeprefix("model."), shard_every=5)
    assert len(list(d.glob("model-*.safetensors"))) > 2
    ref, got = _both(d, "qlora")
    assert_same_model(ref, got)
    assert got.load_report.tensors == len(list_checkpoint(d))


def test_missing_weight_is_an_error(tiny_model, tmp_path):
    d = _resave(tiny_model("llama"), tmp_path / "m", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ModelError, match="lacks 1 weight.*model.layers.1.mlp.up_proj"):
        build_streamed_model(_cfg(d, "qlora"), d, CPU, torch.float32)


def test_shape_mismatch_is_an_error(tiny_model, tmp_path):
    d = _resave(tiny_model("llama"), tmp_path / "m", edit_config={"intermediate_size": 192})
    with pytest.raises(ModelError, match="has shape .* but the model expects .*config.json"):
        build_streamed_model(_cfg(d, "qlora"), d, CPU, torch.float32)


def test_missing_shard_and_bin_only_are_errors(tiny_model, tmp_path):
    d = _resave(tiny_model("llama"), tmp_path / "m", shard_every=6)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelError, match="missing checkpoint shard"):
        build_streamed_model(_cfg(d, "qlora"), d, CPU, torch.float32)
    b = tmp_path / "bin"
    b.mkdir()
    shutil.copy(tiny_model("llama") / "config.json", b)
    (b / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="only PyTorch .bin weights"):
        build_streamed_model(_cfg(b, "qlora"), b, CPU, torch.float32)


def test_random_init_builds_a_runnable_4bit_model_from_config_only(tiny_model, tmp_path):
    d = tmp_path / "cfgonly"
    d.mkdir()
    shutil.copy(tiny_model("llama") / "config.json", d)
    cfg = _cfg(d, "qlora")
    a = build_streamed_model(cfg, d, CPU, torch.float32, random_init=True)
    b = build_streamed_model(cfg, d, CPU, torch.float32, random_init=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(_bits(sa[k]), _bits(sb[k])) for k in sa if "lora_" not in k)  # reproducible
    base = _unwrap(a)
    assert torch.equal(base.model.norm.weight, torch.ones_like(base.model.norm.weight))
    n_entries = len(random_entries(build_skeleton(cfg, d, torch.float32), torch.float32))
    assert a.load_report.tensors == n_entries
    with torch.no_grad():
        assert torch.isfinite(a(input_ids=PROBE).logits).all()


def test_rotary_buffers_rebuilt_when_init_weights_skips_them(tiny_model, monkeypatch):
    """transformers versions differ in what _init_weights covers; a buffer it leaves alone must not stay garbage."""
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel
    d = tiny_model("llama")
    ref = build_model(_cfg(d, "qlora"), d, CPU, torch.float32)
    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", lambda self, module: None)
    got = build_streamed_model(_cfg(d, "qlora"), d, CPU, torch.float32)
    rb, gb = dict(ref.named_buffers()), dict(got.named_buffers())
    assert rb.keys() == gb.keys() and all(torch.equal(rb[k], gb[k]) for k in rb)
