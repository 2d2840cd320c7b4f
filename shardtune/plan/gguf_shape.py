"""The planner's view of a `.gguf` model: its shape read from the file's metadata and tensor table (no weights are
read or dequantized), as the config.json a Hugging Face directory would carry. Training dequantizes the file to the
compute dtype first (shardtune.model.gguf), so the file's own block quantization does not change the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardtune.errors import ModelError
from shardtune.model.gguf import gguf_source, require_gguf
from shardtune.model.shapes import ModelShape, resolve_shape, shape_from_config

# general.architecture -> transformers model_type (Mistral's GGUF files say "llama", as transformers reads them)
ARCH_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                   "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "phi2": "phi"}
MOE_ARCHS = ("qwen2moe", "qwen3moe", "deepseek2", "dbrx", "olmoe", "granitemoe", "llama4", "mixtral")


def _scalar(reader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


def gguf_config(path: Path) -> dict[str, Any]:
    """A config.json-like dict (model_type, sizes, tied embeddings, biases) from a GGUF file's header."""
    require_gguf()
    import gguf
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001  numpy/struct errors on a file that is not GGUF
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(f"GGUF file '{path}' is unreadable ({first}); pass a .gguf model file written by "
                         "llama.cpp's convert scripts or the gguf package") from None
    arch = _scalar(reader, "general.architecture")
    if not arch:
        raise ModelError(f"GGUF file '{path}' has no general.architecture; is it a model file?")
    expert_count = _scalar(reader, f"{arch}.expert_count") or 0
    if arch in MOE_ARCHS or expert_count > 1:
        raise ModelError(f"GGUF file '{path}' is a mixture-of-experts model ({arch}, {expert_count} experts); the "
                         "planner models dense decoders only")
    if arch not in ARCH_MODEL_TYPE:
        raise ModelError(f"GGUF file '{path}': architecture '{arch}' is not planned; the planner reads GGUF "
                         f"architectures {', '.join(ARCH_MODEL_TYPE)}")
    tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}   # GGUF dims: innermost first
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelError(f"GGUF file '{path}' has no token_embd.weight tensor; is it a decoder LM?")

    def req(key: str) -> int:
        v = _scalar(reader, f"{arch}.{key}")
        if v is None:
            raise ModelError(f"GGUF file '{path}' has no {arch}.{key} in its metadata; cannot plan it")
        return int(v)

    heads = req("attention.head_count")
    cfg: dict[str, Any] = {
        "model_type": ARCH_MODEL_TYPE[arch],
        "hidden_size": req("embedding_length"),
        "num_hidden_layers": req("block_count"),
        "intermediate_size": req("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(reader, f"{arch}.attention.head_count_kv") or heads),
        "vocab_size": embd[1],   # the embedding's rows (may be padded past the token list)
        "tie_word_embeddings": "output.weight" not in tensors,
        "max_position_embeddings": _scalar(reader, f"{arch}.context_length"),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "_name_or_path": str(_scalar(reader, "general.name") or path.stem),
    }
    key_length = _scalar(reader, f"{arch}.attention.key_length")
    if key_length:
        cfg["head_dim"] = int(key_length)
    return cfg


def plan_shape(model_cfg) -> ModelShape:
    """The shape the planner uses for a `model` config section: a `.gguf` file (name_or_path, or a directory plus
    model.gguf_file) read from its header, anything else through shardtune.model.shapes.resolve_shape."""
    path = gguf_source(model_cfg)
    if path is None:
        return resolve_shape(model_cfg.name_or_path)
    return shape_from_config(gguf_config(path), name=path.name, source=f"GGUF header: {path}")
