"""The planner's model catalogue: name -> config.json values of the models people fine-tune (hand-entered from each
model's published config.json, URL in the comment), and the built-in tiny Llama's. Only the keys the planner reads are
kept; instruct/chat variants share their base model's shape (shardtune.model.shapes resolves names to entries).
"""

from __future__ import annotations

from typing import Any

from shardtune.builtin.tiny_model import BUILTIN_SHAPE


def _llama(h, inter, layers, heads, kv, vocab, maxpos, tied=False, head_dim=None, model_type="llama"):
    d = dict(model_type=model_type, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
             num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=maxpos,
             tie_word_embeddings=tied)
    if head_dim:
        d["head_dim"] = head_dim
    return d


CATALOGUE: dict[str, dict[str, Any]] = {
    # LLaMA (v1), the QLoRA paper's models: https://huggingface.co/huggyllama/llama-30b/blob/main/config.json and
    # https://huggingface.co/huggyllama/llama-65b/blob/main/config.json ("33B" in the paper is llama-30b)
    "LLaMA-33B": dict(config=_llama(6656, 17920, 60, 52, 52, 32000, 2048),
                      aliases=["huggyllama/llama-30b", "llama-30b", "llama-1-33b", "guanaco-33b"]),
    "LLaMA-65B": dict(config=_llama(8192, 22016, 80, 64, 64, 32000, 2048),
                      aliases=["huggyllama/llama-65b", "llama-1-65b", "guanaco-65b"]),
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "Llama-2-7B": dict(config=_llama(4096, 11008, 32, 32, 32, 32000, 4096),
                       aliases=["meta-llama/Llama-2-7b-hf", "llama-2-7b-chat", "llama2-7b"]),
    # https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json
    "Llama-2-13B": dict(config=_llama(5120, 13824, 40, 40, 40, 32000, 4096),
                        aliases=["meta-llama/Llama-2-13b-hf", "llama2-13b"]),
    # https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json
    "Llama-2-70B": dict(config=_llama(8192, 28672, 80, 64, 8, 32000, 4096),
                        aliases=["meta-llama/Llama-2-70b-hf", "llama2-70b"]),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "Llama-3-8B": dict(config=_llama(4096, 14336, 32, 32, 8, 128256, 8192),
                       aliases=["meta-llama/Meta-Llama-3-8B", "llama3-8b"]),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json (same shape, 128k context)
    "Llama-3.1-8B": dict(config=_llama(4096, 14336, 32, 32, 8, 128256, 131072),
                         aliases=["meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B", "llama3.1-8b",
                                  # distilled from DeepSeek-R1 onto Llama-3.1-8B: the base model's config
                                  "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"]),
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
    "Llama-3-70B": dict(config=_llama(8192, 28672, 80, 64, 8, 128256, 8192),
                        aliases=["meta-llama/Meta-Llama-3-70B", "llama3-70b"]),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "Llama-3.1-70B": dict(config=_llama(8192, 28672, 80, 64, 8, 128256, 131072),
                          aliases=["meta-llama/Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B", "llama3.1-70b",
                                   "llama-3.3-70b", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"]),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (tied embeddings, head_dim 64)
    "Llama-3.2-1B": dict(config=_llama(2048, 8192, 16, 32, 8, 128256, 131072, tied=True, head_dim=64),
                         aliases=["meta-llama/Llama-3.2-1B", "llama3.2-1b"]),
    # https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json (tied embeddings)
    "Llama-3.2-3B": dict(config=_llama(3072, 8192, 28, 24, 8, 128256, 131072, tied=True, head_dim=128),
                         aliases=["meta-llama/Llama-3.2-3B", "llama3.2-3b"]),
    # https://huggingface.co/codellama/CodeLlama-7b-hf/blob/main/config.json
    "CodeLlama-7B": dict(config=_llama(4096, 11008, 32, 32, 32, 32016, 16384),
                         aliases=["codellama/CodeLlama-7b-hf", "codellama-7b-python"]),
    # https://huggingface.co/codellama/CodeLlama-13b-hf/blob/main/config.json
    "CodeLlama-13B": dict(config=_llama(5120, 13824, 40, 40, 40, 32016, 16384),
                          aliases=["codellama/CodeLlama-13b-hf", "codellama-13b-python"]),
    # https://huggingface.co/codellama/CodeLlama-34b-hf/blob/main/config.json (GQA 8, vocab 32000)
    "CodeLlama-34B": dict(config=_llama(8192, 22016, 48, 64, 8, 32000, 16384),
                          aliases=["codellama/CodeLlama-34b-hf", "codellama-34b-python"]),
    # Qwen (v1, remote code): https://huggingface.co/Qwen/Qwen-7B/blob/main/config.json and
    # https://huggingface.co/Qwen/Qwen-14B/blob/main/config.json (intermediate_size is twice the MLP width)
    "Qwen-7B": dict(config=_llama(4096, 22016, 32, 32, 32, 151936, 8192, model_type="qwen"),
                    aliases=["Qwen/Qwen-7B", "qwen-7b-chat", "Qwen/Qwen-7B-Chat-Int4"]),
    "Qwen-14B": dict(config=_llama(5120, 27392, 40, 40, 40, 152064, 8192, model_type="qwen"),
                     aliases=["Qwen/Qwen-14B", "qwen-14b-chat", "Qwen/Qwen-14B-Chat-Int4"]),
    # https://huggingface.co/Qwen/Qwen1.5-7B/blob/main/config.json (q/k/v biases: model_type qwen2)
    "Qwen1.5-7B": dict(config=_llama(4096, 11008, 32, 32, 32, 151936, 32768, model_type="qwen2"),
                       aliases=["Qwen/Qwen1.5-7B"]),
    # https://huggingface.co/Qwen/Qwen1.5-14B/blob/main/config.json
    "Qwen1.5-14B": dict(config=_llama(5120, 13696, 40, 40, 40, 152064, 32768, model_type="qwen2"),
                        aliases=["Qwen/Qwen1.5-14B"]),
    # https://huggingface.co/Qwen/Qwen1.5-32B/blob/main/config.json (GQA 8)
    "Qwen1.5-32B": dict(config=_llama(5120, 27392, 64, 40, 8, 152064, 32768, model_type="qwen2"),
                        aliases=["Qwen/Qwen1.5-32B"]),
    # https://huggingface.co/Qwen/Qwen1.5-72B/blob/main/config.json
    "Qwen1.5-72B": dict(config=_llama(8192, 24576, 80, 64, 64, 152064, 32768, model_type="qwen2"),
                        aliases=["Qwen/Qwen1.5-72B"]),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    "Qwen2.5-7B": dict(config=_llama(3584, 18944, 28, 28, 4, 152064, 131072, model_type="qwen2"),
                       aliases=["Qwen/Qwen2.5-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
                                # Qwen2-7B has the same dimensions (config.json of Qwen/Qwen2-7B)
                                "Qwen/Qwen2-7B"]),
    # https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json
    "Qwen2.5-14B": dict(config=_llama(5120, 13824, 48, 40, 8, 152064, 131072, model_type="qwen2"),
                        aliases=["Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"]),
    # https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json
    "Qwen2.5-32B": dict(config=_llama(5120, 27648, 64, 40, 8, 152064, 131072, model_type="qwen2"),
                        aliases=["Qwen/Qwen2.5-32B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"]),
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    "Qwen2.5-72B": dict(config=_llama(8192, 29568, 80, 64, 8, 152064, 131072, model_type="qwen2"),
                        aliases=["Qwen/Qwen2.5-72B"]),
    # https://huggingface.co/01-ai/Yi-34B/blob/main/config.json (Llama architecture, GQA 8, vocab 64000)
    # https://huggingface.co/01-ai/Yi-1.5-34B-Chat/blob/main/config.json is the same architecture
    "Yi-34B": dict(config=_llama(7168, 20480, 60, 56, 8, 64000, 4096),
                   aliases=["01-ai/Yi-34B", "yi-34b-chat", "01-ai/Yi-1.5-34B", "Yi-1.5-34B"]),
    # https://huggingface.co/01-ai/Yi-1.5-6B-Chat/blob/main/config.json and
    # https://huggingface.co/01-ai/Yi-1.5-9B/blob/main/config.json (GQA 4, vocab 64000, 4k context)
    "Yi-1.5-6B": dict(config=_llama(4096, 11008, 32, 32, 4, 64000, 4096), aliases=["01-ai/Yi-1.5-6B", "01-ai/Yi-6B"]),
    "Yi-1.5-9B": dict(config=_llama(4096, 11008, 48, 32, 4, 64000, 4096), aliases=["01-ai/Yi-1.5-9B", "01-ai/Yi-9B"]),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json (q/k norms over head_dim; no biases)
    "Qwen3-8B": dict(config=_llama(4096, 12288, 36, 32, 8, 151936, 40960, head_dim=128, model_type="qwen3"),
                     aliases=["Qwen/Qwen3-8B"]),
    # https://huggingface.co/google/gemma-2-9b/blob/main/config.json (tied, head_dim 256, 4 norms per layer)
    "Gemma-2-9B": dict(config=_llama(3584, 14336, 42, 16, 8, 256000, 8192, tied=True, head_dim=256,
                                     model_type="gemma2"), aliases=["google/gemma-2-9b", "gemma-2-9b-it"]),
    # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json
    "Gemma-3-1B": dict(config=_llama(1152, 6912, 26, 4, 1, 262144, 32768, tied=True, head_dim=256,
                                     model_type="gemma3_text"), aliases=["google/gemma-3-1b-pt", "gemma-3-1b-it"]),
    # https://huggingface.co/google/gemma-3-12b-pt/blob/main/config.json (text_config)
    "Gemma-3-12B": dict(config=_llama(3840, 15360, 48, 16, 8, 262208, 131072, tied=True, head_dim=256,
                                      model_type="gemma3_text"), aliases=["google/gemma-3-12b-pt", "gemma-3-12b-it"]),
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json (fused qkv and gate_up)
    "Phi-3-mini-4k": dict(config=_llama(3072, 8192, 32, 32, 32, 32064, 4096, model_type="phi3"),
                          aliases=["microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"]),
    # https://huggingface.co/microsoft/phi-4/blob/main/config.json (model_type phi3, GQA 10)
    "Phi-4": dict(config=_llama(5120, 17920, 40, 40, 10, 100352, 16384, model_type="phi3"),
                  aliases=["microsoft/phi-4"]),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "Mistral-7B": dict(config=_llama(4096, 14336, 32, 32, 8, 32000, 32768, model_type="mistral"),
                       aliases=["mistralai/Mistral-7B-v0.1", "mistral-7b-v0.1", "mistral-7b-v0.2"]),
    # https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json (vocab 32768)
    "Mistral-7B-v0.3": dict(config=_llama(4096, 14336, 32, 32, 8, 32768, 32768, model_type="mistral"),
                            aliases=["mistralai/Mistral-7B-v0.3"]),
}

# The quickstart's tiny Llama: the very shape shardtune.builtin.tiny_model.builtin_model_dir builds (one source).
_b = BUILTIN_SHAPE
TINY_LLAMA = _llama(_b["hidden_size"], _b["intermediate_size"], _b["num_hidden_layers"], _b["num_attention_heads"],
                    _b["num_key_value_heads"], _b["vocab_size"], 2048)
TINY_LLAMA["head_dim"] = _b["hidden_size"] // _b["num_attention_heads"]
