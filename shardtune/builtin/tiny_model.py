"""Tiny real-architecture models and tokenizers, nothing downloaded: the tests' (built locally) and the quickstart's
(shipped pretrained in shardtune/assets/tiny-llama, loaded by `builtin_model_dir` after a hash check).

`build_tiny_model_dir` writes a genuine Hugging Face model directory (config.json, model.safetensors, tokenizer files)
so that every caller loads it through the same code path a user's checkpoint takes.
"""

from __future__ import annotations

import json
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


# A word with its leading space, a run of punctuation with its leading space, or whitespace: one pre-token each.
WORD_PATTERN = r" ?\w+| ?[^\w\s]+|\s+"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE,
                    word_tokens: bool = False):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a transformers fast tokenizer. word_tokens=True
    splits before words (WORD_PATTERN) and, with a vocab_size above the corpus's word count, makes every word of the
    corpus one token (`ĠFrance` after a space, `France` after a quote), so a model can copy a value from a question
    into SQL; text outside the corpus still falls back to bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if word_tokens:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
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
                         seed: int = 0, max_position_embeddings: int = 2048, word_tokens: bool = False,
                         **overrides) -> Path:
    """Write a tiny randomly initialised `arch` model plus a tokenizer trained on `corpus` to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus, vocab_size=vocab_size, word_tokens=word_tokens)
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


# The quickstart's model (pretrain_base builds it): sizes are multiples of 64 because bitsandbytes' CPU inference
# layout needs them; 1024 vocabulary rows hold the 931-entry word-level tokenizer.
BUILTIN_SHAPE = dict(arch="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024)


def builtin_model_dir() -> Path:
    """The quickstart's tiny Llama: the pretrained base shipped in shardtune/assets/tiny-llama (built once, offline,
    by `python -m shardtune.builtin.pretrain_base`), after checking its files against the hashes in base.json."""
    from shardtune.builtin.pretrain_base import ASSET_DIR, MANIFEST, file_hashes
    from shardtune.errors import ModelError

    rebuild = "reinstall shardtune, or rebuild it with `python -m shardtune.builtin.pretrain_base`"
    manifest = ASSET_DIR / MANIFEST
    if not manifest.is_file():
        raise ModelError(f"builtin:tiny-llama: {manifest} is missing (an install without package data?); {rebuild}")
    recorded = json.loads(manifest.read_text())["sha256"]
    found = file_hashes(ASSET_DIR)
    changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
    if changed:
        raise ModelError(f"builtin:tiny-llama: {', '.join(changed)} in {ASSET_DIR} missing or not the shipped file "
                         f"(sha256 differs from base.json); {rebuild}")
    return ASSET_DIR
