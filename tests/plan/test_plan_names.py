"""Names users type: GPU names matched by whole words with the memory in the name deciding the board, refusals for
accelerators the planner does not model, hub ids with org prefixes and Instruct/Chat words, the local Hugging Face
cache, mixture-of-experts refusals, and a warning past max_position_embeddings (issue 15)."""

from __future__ import annotations

import json

import pytest

from shardtune.config import load_config
from shardtune.errors import ConfigError, ModelError
from shardtune.hardware import GiB, find_gpu, lookup_gpu, parse_gpus
from shardtune.model.shapes import resolve_shape
from shardtune.plan import auto_plan, estimate


@pytest.mark.parametrize("name, board", [
    ("A100-PCIE-80GB", "A100-PCIe-80GB"),          # was the 40 GB card (substring "A100")
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB"),
    ("A100-SXM4-40GB", "A100-40GB"),
    ("V100-PCIE-32GB", "V100-32GB"),               # was the 16 GB card
    ("V100-PCIE-16GB", "V100-16GB"),
    ("L40", "L40-48GB"),                           # was L4
    ("NVIDIA L40S", "L40S-48GB"),
    ("L4", "L4-24GB"),
    ("A10", "A10-24GB"),
    ("NVIDIA A10G", "A10G-24GB"),
    ("NVIDIA H100 NVL", "H100-NVL-94GB"),
    ("H100 PCIe", "H100-PCIe-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100-80GB"),
    ("NVIDIA RTX 6000 Ada Generation", "RTX6000Ada-48GB"),
    ("NVIDIA RTX A6000", "A6000-48GB"),
    ("RTX A5000", "A5000-24GB"),
    ("NVIDIA GeForce RTX 4080", "RTX4080-16GB"),
    ("RTX 5090", "RTX5090-32GB"),
    ("4090", "RTX4090-24GB"),
    ("A40", "A40-48GB"),
    ("Tesla T4", "T4-16GB"),
    ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "A100-80GB"),   # a MIG slice is planned as its board
])
def test_gpu_names_are_matched_exactly(name, board):
    assert lookup_gpu(name).name == board


def test_every_gpu_of_the_issue_list_is_an_entry_or_a_refusal():
    for name in ["A5000", "A6000", "3090", "4090", "5090", "4080", "RTX 6000 Ada", "L4", "L40", "L40S", "A40", "A10",
                 "A10G", "T4", "V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "A100-PCIe-40GB",
                 "A100-PCIe-80GB", "H100-SXM", "H100 PCIe", "H100 NVL", "H200"]:
        g = parse_gpus(name).gpu
        assert g.memory_bytes > 10 * GiB and g.peak_tflops > 0 and g.mem_bandwidth_gbs > 0, name
    for name in ["MI250", "AMD Instinct MI300X"]:
        with pytest.raises(ConfigError, match="is not modelled by the planner.*--gpus 1x"):
            parse_gpus(f"8x{name}")


def test_unknown_gpu_names_list_close_matches():
    with pytest.raises(ConfigError, match=r"unknown GPU 'RTX4095' \(close: .*RTX4090-24GB"):
        parse_gpus("2xRTX4095")
    with pytest.raises(ConfigError, match="no A100 board has 48 GB"):
        parse_gpus("A100-48GB")
    assert find_gpu("Quantum Accelerator 9000") is None


@pytest.mark.parametrize("hub_id, entry", [
    ("mistralai/Mistral-7B-Instruct-v0.2", "Mistral-7B"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("meta-llama/Llama-3.3-70B-Instruct", "Llama-3.1-70B"),
    ("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B"),
    ("codellama/CodeLlama-7b-Instruct-hf", "CodeLlama-7B"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "Llama-3.1-8B"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen2.5-32B"),
])
def test_hub_ids_with_org_and_variant_words_resolve(hub_id, entry):
    assert resolve_shape(hub_id).name == entry


@pytest.mark.parametrize("hub_id", ["mistralai/Mixtral-8x7B-Instruct-v0.1", "Qwen/Qwen3-30B-A3B",
                                    "deepseek-ai/DeepSeek-V3"])
def test_mixture_of_experts_is_refused_clearly(hub_id):
    with pytest.raises(ModelError, match="mixture-of-experts"):
        resolve_shape(hub_id)


def test_unknown_model_names_list_close_matches():
    with pytest.raises(ModelError, match=r"close: Llama-3-8B"):
        resolve_shape("lama-3-8b")


def test_a_hub_id_in_the_local_cache_is_read_from_there(tmp_path, monkeypatch):
    """The cached config.json wins over the catalogue (it is the exact model, not a shared shape)."""
    snap = tmp_path / "models--acme--Llama-3-8B-Wide" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--Llama-3-8B-Wide" / "refs").mkdir()
    (tmp_path / "models--acme--Llama-3-8B-Wide" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1000, max_position_embeddings=1024)))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    shape = resolve_shape("acme/Llama-3-8B-Wide")
    assert (shape.hidden, shape.layers, shape.vocab) == (512, 3, 1000) and "hub cache" in shape.source


def test_a_sequence_past_max_position_embeddings_warns():
    cfg = load_config(None, ["model.name_or_path=llama-2-7b", "data.max_seq_len=8192", "train.micro_batch_size=1",
                             "train.gradient_checkpointing=true"])
    est = estimate(cfg, parse_gpus("1xH100"))
    assert any("max_position_embeddings (4096)" in n for n in est.notes)
    assert any("max_position_embeddings" in n for n in auto_plan(cfg, parse_gpus("1xH100")).notes)
    ok = load_config(None, ["model.name_or_path=llama-2-7b", "data.max_seq_len=4096"])
    assert not any("max_position_embeddings" in n for n in estimate(ok, parse_gpus("1xH100")).notes)
