"""Tiny real-architecture models and tokenizers built locally (nothing downloaded): the quickstart's model and the tests'.

`build_tiny_model_dir` writes a genuine Hugging Face model directory (config.json, model.safetensors, tokenizer files)
so that every caller loads it through the same code path a user's checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from shardtune.builtin.templates import CHATML_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

ARCH_CONFIGS = {
    # Shapes are tiny; the classes and the wiring (GQA, rope, tied or not) are the real ones.
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None),
}


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE,
                    space_tokens: bool = False):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a transformers fast tokenizer. space_tokens=True
    makes every space its own token, so a word has one token id wherever it stands (`from France?` and `= 'France'`
    share it): the quickstart's model can then learn to copy values from the question into the SQL."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if space_tokens:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_model_dir(out_dir: str | Path, corpus: Iterable[str], arch: str = "llama", vocab_size: int = 512,
                         seed: int = 0, max_position_embeddings: int = 2048, space_tokens: bool = False,
                         **overrides) -> Path:
    """Write a tiny randomly initialised `arch` model plus a tokenizer trained on `corpus` to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus, vocab_size=vocab_size, space_tokens=space_tokens)
    shape = dict(ARCH_CONFIGS[arch])
    shape.update(overrides)
    model_type = shape.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# The quickstart's model: sizes are multiples of 64 because bitsandbytes' CPU inference layout needs them.
BUILTIN_SHAPE = dict(arch="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=768, space_tokens=True)


def builtin_model_dir(corpus_texts: list[str]) -> Path:
    """The quickstart's tiny Llama, built once into the cache and reused (keyed by its corpus and shape)."""
    key = hashlib.sha256(json.dumps([corpus_texts, BUILTIN_SHAPE]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("SHARDTUNE_CACHE", Path.home() / ".cache" / "shardtune"))
    out = root / f"tiny-llama-{key}"
    if not (out / "config.json").exists() or not (out / "model.safetensors").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_model_dir(tmp, corpus_texts, **BUILTIN_SHAPE)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return out
