"""Shared pieces of the GPU benchmarks: reference shapes, a random-weight checkpoint writer, random token data, MFU."""

from __future__ import annotations

import os
from pathlib import Path

# Public architecture shapes from the models' config.json files (meta-llama/Meta-Llama-3-8B, Llama-3.2-1B/3B,
# Llama-2-13b/70b, Qwen/Qwen2.5-14B/72B); the benchmarks' weights are random. The one table every bench script uses.
SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=False),
    "llama3-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=True),
    "llama3-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=True),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        rms_norm_eps=1e-6),
    "llama2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0,
                       tie_word_embeddings=False),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False,
                        rms_norm_eps=1e-6),
}

H100_BF16_CEILING = 800e12  # measured dense bf16 matmul ceiling on this workplace's H100/H200 (device README)


def hf_config(shape: str, max_pos: int = 8192):
    """The transformers config of a SHAPES entry."""
    from transformers import AutoConfig
    spec = dict(SHAPES[shape])
    kw = dict(max_position_embeddings=max_pos, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(spec)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def write_random_checkpoint(shape: str, out: Path, device: str = "cuda", seed: int = 0) -> Path:
    """A real HF directory (config.json, bf16 safetensors shards, a small tokenizer) with N(0, 0.02) weights, written
    once per shape by bench/load_bench.py's shard-at-a-time writer; the directory appears complete or not at all."""
    from bench.load_bench import write_random_checkpoint as write_shards
    from shardtune.builtin.tiny_model import build_tokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    write_shards(tmp, hf_config(shape), seed=seed, device=device)
    build_tokenizer([f"sample text {i}" for i in range(200)], vocab_size=300).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def random_samples(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def model_flops_per_token(shape: str, seq: int, recompute: float) -> float:
    """Training FLOPs per token of a LoRA/QLoRA step (frozen base: forward 2N + input-gradient 2N, +2N when the
    forward is recomputed), plus causal attention (forward 2*s*h per layer; x3 with backward, x4 with recompute).
    N counts every matmul weight (embedding lookups excluded, the output projection included)."""
    s = SHAPES[shape]
    h, L, inter, v = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    n = L * per_layer + h * v
    f = float(recompute)  # the share of layers recomputed (True = 1.0: every layer)
    attn_fwd = 2 * L * seq * h
    return (4 + 2 * f) * n + attn_fwd * (3 + f)


def write_config_dir(shape: str, out: Path) -> Path:
    """config.json + a small tokenizer and no weights: enough for model.random_init=true runs of any size."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    hf_config(shape).save_pretrained(tmp)
    from shardtune.builtin.tiny_model import build_tokenizer
    build_tokenizer([f"sample text {i}" for i in range(200)], vocab_size=300).save_pretrained(tmp)
    os.replace(tmp, out)  # other ranks wait for the directory to appear complete
    return out


def peer_model(model_dir: str, method: str, ckpt: bool):
    """The Hugging Face peer's model, as its users build it: bitsandbytes NF4 (double quantization, bf16 compute on
    CUDA) for qlora, prepare_model_for_kbit_training, then peft LoRA r16/alpha 32/dropout 0.05 on all linears."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cuda = torch.cuda.is_available()
    qc = None
    if method == "qlora":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc,
                                                 dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"})
    if qc is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def peer_training_args(output_dir: str, micro_batch: int, max_steps: int, ckpt: bool, liger: bool = False, **extra):
    """The HF Trainer arguments every benchmark gives the peer: bf16 on CUDA (autocast), AdamW (torch), no logging,
    saving or reporting, no dataloader workers, columns kept as given; `extra` adds or overrides (seed, sampler)."""
    import torch
    from transformers import TrainingArguments
    cuda = torch.cuda.is_available()
    kw = dict(output_dir=output_dir, per_device_train_batch_size=micro_batch, max_steps=max_steps, learning_rate=2e-4,
              bf16=cuda, use_cpu=not cuda, gradient_checkpointing=ckpt, optim="adamw_torch", logging_steps=1000,
              save_strategy="no", report_to=[], use_liger_kernel=liger, dataloader_num_workers=0,
              remove_unused_columns=False, disable_tqdm=True)
    kw.update(extra)
    return TrainingArguments(**kw)


def step_timer(times: list):
    """A Trainer callback appending each step's wall time (device-synchronized) to `times`."""
    import time

    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            times.append(time.perf_counter() - self.t)

    return Timer()
