"""Model shapes: the catalogue against published parameter counts, name resolution, config.json parsing against
the real transformers modules, and the errors for unknown models."""

from __future__ import annotations

import json

import pytest

from shardtune.errors import ModelError
from shardtune.model.shapes import resolve_shape, shape_from_config

# Parameter counts as published on the model cards / reported by transformers for the real checkpoints.
PUBLISHED = {
    "Llama-2-7B": 6_738_415_616,
    "Llama-2-13B": 13_015_864_320,
    "Llama-2-70B": 68_976_648_192,
    "Llama-3-8B": 8_030_261_248,
    "Llama-3-70B": 70_553_706_496,
    "Llama-3.2-1B": 1_235_814_400,
    "Mistral-7B": 7_241_732_096,
    "Qwen2.5-7B": 7_615_616_512,
    "Qwen2.5-72B": 72_706_203_648,
    "Qwen3-8B": 8_190_735_360,
    "Gemma-2-9B": 9_241_705_984,
    "Gemma-3-1B": 999_885_952,
    "Phi-3-mini-4k": 3_821_079_552,
    "Phi-4": 14_659_507_200,
    "Yi-34B": 34_388_917_248,
    "LLaMA-33B": 32_528_943_616,
    "LLaMA-65B": 65_285_660_672,
}


@pytest.mark.parametrize("name,count", sorted(PUBLISHED.items()))
def test_catalogue_parameter_counts_match_published(name, count):
    assert resolve_shape(name).params_total == count


def test_llama3_8b_breakdown_by_hand():
    s = resolve_shape("llama-3-8b")
    # per layer: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 4096x14336
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert s.params_linear == 32 * per_layer == 6_979_321_856
    assert s.params_embeddings == 2 * 128256 * 4096
    assert s.params_norms == 32 * 2 * 4096 + 4096
    assert (s.heads, s.kv_heads, s.head_dim, s.q_dim, s.kv_dim) == (32, 8, 128, 4096, 1024)
    assert [lin.name for lin in s.linears] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]


@pytest.mark.parametrize("alias", ["llama-3-8b", "Llama-3-8B", "meta-llama/Meta-Llama-3-8B", "llama3-8b",
                                   "meta-llama/Meta-Llama-3-8B-Instruct", "LLAMA_3_8B"])
def test_catalogue_names_are_case_and_format_insensitive(alias):
    assert resolve_shape(alias).name == "Llama-3-8B"


def test_instruct_and_versions_resolve_to_their_base_shapes():
    assert resolve_shape("Qwen/Qwen2.5-72B-Instruct").name == "Qwen2.5-72B"
    assert resolve_shape("codellama/CodeLlama-34b-Instruct-hf").name == "CodeLlama-34B"
    assert resolve_shape("mistralai/Mistral-7B-v0.3").vocab == 32768
    assert resolve_shape("mistral-7b-v0.1").vocab == 32000
    assert resolve_shape("Qwen1.5-32B").kv_heads == 8
    assert resolve_shape("Qwen1.5-72B").kv_heads == 64


def test_builtin_tiny_llama_is_the_quickstart_shape():
    from shardtune.builtin.tiny_model import BUILTIN_SHAPE as b
    s = resolve_shape("builtin:tiny-llama")
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab) == (
        b["hidden_size"], b["num_hidden_layers"], b["num_attention_heads"], b["num_key_value_heads"],
        b["intermediate_size"], b["vocab_size"]) == (128, 4, 4, 2, 384, 1024)


def test_unknown_model_names_the_catalogue_and_how_to_add_one():
    with pytest.raises(ModelError) as e:
        resolve_shape("acme/SuperModel-9B")
    msg = str(e.value)
    assert "Llama-3-8B" in msg and "SHARDTUNE_MODEL_CATALOG" in msg and "config.json" in msg
    assert "\n" not in msg


def test_unknown_model_type_is_a_model_error():
    with pytest.raises(ModelError, match="model_type 'mamba'"):
        shape_from_config({"model_type": "mamba", "hidden_size": 8})
    with pytest.raises(ModelError, match="no 'num_hidden_layers'"):
        shape_from_config({"model_type": "llama", "hidden_size": 8})


def test_add_a_model_from_a_yaml_file_and_from_the_catalogue_env(tmp_path, monkeypatch):
    f = tmp_path / "mymodel.yaml"
    f.write_text("name: My-Model-3B\naliases: [acme/my-model-3b]\nconfig:\n  model_type: llama\n  hidden_size: 2560\n"
                 "  intermediate_size: 6912\n  num_hidden_layers: 30\n  num_attention_heads: 20\n"
                 "  num_key_value_heads: 4\n  vocab_size: 50000\n")
    s = resolve_shape(str(f))
    assert s.name == "My-Model-3B" and s.kv_heads == 4
    other = tmp_path / "cat"
    other.mkdir()
    (other / "x.json").write_text(json.dumps({"name": "Other-1B", "config": {
        "model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 1000}}))
    monkeypatch.setenv("SHARDTUNE_MODEL_CATALOG", str(other))
    s2 = resolve_shape("other-1b")
    assert s2.name == "Other-1B" and all(lin.bias for lin in s2.linears[:3])


def test_local_directory_and_tiny_model_param_count_match_torch(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM
    d = tiny_model("llama")
    s = resolve_shape(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    assert s.params_total == sum(p.numel() for p in model.parameters())


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_shape(str(tmp_path))


# Small configs of each supported architecture, instantiated by transformers on the meta device: the shape's
# parameter count and per-linear shapes must equal the real modules'.
ARCHS = {
    "llama": dict(attention_bias=True),
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=24),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi3": {},
    "phi": {},
}


@pytest.mark.parametrize("mt", sorted(ARCHS))
def test_shape_matches_transformers_modules(mt):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, **ARCHS[mt])
    if mt == "phi":
        kw.pop("num_key_value_heads")
    cfg = AutoConfig.for_model(mt, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shape = shape_from_config(cfg.to_dict())
    params = dict(model.named_parameters())
    assert shape.params_total == sum(p.numel() for p in params.values())
    for lin in shape.linears:
        w = next(p for n, p in params.items() if n.endswith(f"layers.0.{lin.path}.weight"))
        assert tuple(w.shape) == (lin.out_features, lin.in_features), lin.path
        has_bias = any(n.endswith(f"layers.0.{lin.path}.bias") for n in params)
        assert has_bias == lin.bias, lin.path


@pytest.mark.parametrize("hub_id,name,layers", [("01-ai/Yi-1.5-9B-Chat", "Yi-1.5-9B", 48),
                                                ("01-ai/Yi-1.5-6B-Chat", "Yi-1.5-6B", 32),
                                                ("01-ai/Yi-1.5-34B-Chat", "Yi-34B", 60)])
def test_yi_1_5_hub_ids_resolve(hub_id, name, layers):
    """Yi-1.5's chat ids resolve to catalogue shapes (config.json values from the 01-ai repos; 34B is Yi-34B's
    architecture)."""
    s = resolve_shape(hub_id)
    assert (s.name, s.layers, s.vocab, s.kv_heads) == (name, layers, 64000, 8 if layers == 60 else 4)
