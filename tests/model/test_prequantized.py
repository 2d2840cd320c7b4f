"""Pre-quantized checkpoints (GPTQ, AWQ, already-bitsandbytes) cannot be a QLoRA base: config.json alone must stop the
run with one line that names the format and the alternatives, on the from_pretrained path and the streamed path."""

from __future__ import annotations

import json

import pytest

from shardtune.config import RunConfig
from shardtune.errors import ModelError
from shardtune.model.load import read_model_config

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}

# quantization_config blocks as the hub's GPTQ / AWQ / bitsandbytes exports write them
QUANT_CONFIGS = {
    "GPTQ": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
             "damp_percent": 0.01, "true_sequential": True},
    "AWQ": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                     "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
                     "bnb_4bit_quant_storage": "uint8"},
}


def _model_dir(tmp_path, label):
    d = tmp_path / label
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA, "quantization_config": QUANT_CONFIGS[label]}))
    return d


def _check_message(msg: str, label: str) -> None:
    assert "\n" not in msg
    assert f"pre-quantized {label} checkpoint" in msg
    assert "original bf16/fp16 checkpoint" in msg          # alternative 1: the unquantized weights
    assert "LoRA on the quantized model" in msg            # alternative 2: a library that trains on that format


@pytest.mark.parametrize("label", ["GPTQ", "AWQ", "bitsandbytes"])
def test_read_model_config_names_the_format_and_the_alternatives(tmp_path, label):
    d = _model_dir(tmp_path, label)
    with pytest.raises(ModelError) as e:
        read_model_config(d)
    _check_message(str(e.value), label)
    assert str(d) in str(e.value)


@pytest.mark.parametrize("label", ["GPTQ", "AWQ", "bitsandbytes"])
def test_streamed_loader_rejects_before_reading_weights(tmp_path, label):
    """No safetensors exist in the directory: the error must come from config.json, not from a failed read."""
    import torch
    from shardtune.model.stream import build_streamed_model
    cfg = RunConfig()
    cfg.train.method = "qlora"
    with pytest.raises(ModelError) as e:
        build_streamed_model(cfg, _model_dir(tmp_path, label), torch.device("cpu"), torch.float32)
    _check_message(str(e.value), label)


def test_plain_config_passes(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    assert read_model_config(d)["model_type"] == "llama"
