"""Model shapes from config.json alone (no weights): dimensions, per-layer linear shapes and parameter counts.

The planner needs only these numbers. `resolve_shape` accepts a local model directory, a config file, a name from
the built-in catalogue (hand-entered from each model's published config.json), or `builtin:tiny-llama`.
Pure Python: importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shardtune.errors import ModelError
from shardtune.model.catalogue import CATALOGUE, TINY_LLAMA

# Which tensor each linear reads: linears that read the same tensor share one saved input in autograd.
INPUT_GROUP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in", "o": "attn_out",
               "gate": "mlp_in", "up": "mlp_in", "gate_up": "mlp_in", "down": "mlp_mid"}


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a decoder block. `path` is its module path inside the block (what LoRA targets match)."""

    path: str          # e.g. "self_attn.q_proj"
    role: str          # q k v o gate up down qkv gate_up
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def input_group(self) -> str:
        return INPUT_GROUP[self.role]


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a decoder-only LM, read from its config.json."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    linears: tuple[LinearShape, ...]          # of ONE decoder layer
    norm_params_per_layer: int                # RMSNorm/LayerNorm weights (+biases) inside one layer
    final_norm_params: int
    gated_mlp: bool = True                    # SwiGLU/GeGLU (gate * up) vs a plain 2-layer MLP
    lm_head_bias: bool = False
    max_position: int | None = None
    checkpoint_dtype: str = "bfloat16"        # dtype the weights are stored in on disk (config.json 'dtype')
    source: str = ""

    # ---- derived dimensions
    @property
    def block_norms(self) -> int:
        """Normalisation layers applied to the residual stream inside one decoder layer."""
        return {"gemma2": 4, "gemma3_text": 4, "phi": 1}.get(self.model_type, 2)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    # ---- parameter counts
    @property
    def linear_weight_params_per_layer(self) -> int:
        return sum(lin.weight_numel for lin in self.linears)

    @property
    def linear_bias_params_per_layer(self) -> int:
        return sum(lin.out_features for lin in self.linears if lin.bias)

    @property
    def params_linear(self) -> int:
        """Weights of the linears inside the decoder blocks: what 4-bit / 8-bit quantization stores packed."""
        return self.layers * self.linear_weight_params_per_layer

    @property
    def params_linear_bias(self) -> int:
        return self.layers * self.linear_bias_params_per_layer

    @property
    def params_embed(self) -> int:
        return self.vocab * self.hidden

    @property
    def params_lm_head(self) -> int:
        """Untied output projection (0 when tied to the input embedding)."""
        if self.tied_embeddings:
            return 0
        return self.vocab * self.hidden + (self.vocab if self.lm_head_bias else 0)

    @property
    def params_embeddings(self) -> int:
        return self.params_embed + self.params_lm_head

    @property
    def params_norms(self) -> int:
        return self.layers * self.norm_params_per_layer + self.final_norm_params

    @property
    def params_total(self) -> int:
        return self.params_linear + self.params_linear_bias + self.params_embeddings + self.params_norms

    @property
    def params_per_layer(self) -> int:
        return self.linear_weight_params_per_layer + self.linear_bias_params_per_layer + self.norm_params_per_layer

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (block linears + output projection; not the lookup)."""
        return self.params_linear + self.vocab * self.hidden

    def targeted_linears(self, targets: str | list[str] | tuple[str, ...]) -> tuple[LinearShape, ...]:
        """The block linears LoRA wraps: 'all-linear' (peft: every linear but the output layer) or names/suffixes."""
        if isinstance(targets, str):
            if targets == "all-linear":
                return self.linears
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        out = []
        for lin in self.linears:
            for t in targets:
                if lin.path == t or lin.path.endswith("." + t) or lin.name == t:
                    out.append(lin)
                    break
        return tuple(out)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name, "model_type": self.model_type, "hidden": self.hidden, "layers": self.layers,
            "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "intermediate": self.intermediate, "vocab": self.vocab, "tied_embeddings": self.tied_embeddings,
            "params_total": self.params_total, "params_linear": self.params_linear,
            "params_embeddings": self.params_embeddings, "params_norms": self.params_norms,
            "params_linear_bias": self.params_linear_bias, "source": self.source,
            "linears": [{"path": lin.path, "in": lin.in_features, "out": lin.out_features, "bias": lin.bias}
                        for lin in self.linears],
        }


# ------------------------------------------------------------------------------------------------ config.json parsing

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen", "gemma", "gemma2", "gemma3_text", "phi3", "phi")

# transformers' per-architecture default for tie_word_embeddings when config.json omits it
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "qwen": False, "gemma": True,
                "gemma2": True, "gemma3_text": True, "phi3": False, "phi": False}


def _req(cfg: Mapping[str, Any], key: str, where: str) -> int:
    v = cfg.get(key)
    if v is None:
        raise ModelError(f"{where}: config has no '{key}'; is this a Hugging Face decoder LM config.json?")
    return int(v)


def shape_from_config(cfg: Mapping[str, Any], name: str | None = None, source: str = "") -> ModelShape:
    """Build a ModelShape from a config.json dict. Unknown model types are a ModelError naming the supported ones."""
    where = source or name or "config"
    if isinstance(cfg.get("text_config"), Mapping) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    mt = cfg.get("model_type")
    if not mt:
        raise ModelError(f"{where}: config has no model_type; is this a Hugging Face transformers config.json?")
    if mt in MOE_MODEL_TYPES:
        raise ModelError(f"{where}: model_type '{mt}' is a mixture-of-experts model; the planner models dense "
                         f"decoders only ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{where}: model_type '{mt}' is not supported by the planner; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    h = _req(cfg, "hidden_size", where)
    layers = _req(cfg, "num_hidden_layers", where)
    heads = _req(cfg, "num_attention_heads", where)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg.get("kv_channels") or h // heads)
    vocab = _req(cfg, "vocab_size", where)
    inter = _req(cfg, "intermediate_size", where)
    tied = bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT[mt]))
    qd, kvd = heads * head_dim, kv * head_dim
    norm = h                     # RMSNorm: one weight vector
    norms_per_layer = 2
    final_norm = h
    gated, lm_head_bias = True, False

    if mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"):
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
        linears = (
            LinearShape("self_attn.q_proj", "q", h, qd, qkv_bias),
            LinearShape("self_attn.k_proj", "k", h, kvd, qkv_bias),
            LinearShape("self_attn.v_proj", "v", h, kvd, qkv_bias),
            LinearShape("self_attn.o_proj", "o", qd, h, o_bias),
            LinearShape("mlp.gate_proj", "gate", h, inter, mlp_bias),
            LinearShape("mlp.up_proj", "up", h, inter, mlp_bias),
            LinearShape("mlp.down_proj", "down", inter, h, mlp_bias),
        )
        norm_params = norms_per_layer * norm
        if mt in ("gemma2", "gemma3_text"):
            norm_params = 4 * norm   # pre/post attention and pre/post feed-forward norms
        if mt in ("qwen3", "gemma3_text"):
            norm_params += 2 * head_dim   # q_norm, k_norm over head_dim
    elif mt == "phi3":
        linears = (
            LinearShape("self_attn.qkv_proj", "qkv", h, qd + 2 * kvd),
            LinearShape("self_attn.o_proj", "o", qd, h),
            LinearShape("mlp.gate_up_proj", "gate_up", h, 2 * inter),
            LinearShape("mlp.down_proj", "down", inter, h),
        )
        norm_params = 2 * norm
    elif mt == "phi":
        # phi-1/2: parallel attention + MLP behind one LayerNorm (weight + bias); plain GELU MLP; biases everywhere.
        linears = (
            LinearShape("self_attn.q_proj", "q", h, qd, True),
            LinearShape("self_attn.k_proj", "k", h, kvd, True),
            LinearShape("self_attn.v_proj", "v", h, kvd, True),
            LinearShape("self_attn.dense", "o", qd, h, True),
            LinearShape("mlp.fc1", "up", h, inter, True),
            LinearShape("mlp.fc2", "down", inter, h, True),
        )
        norm_params = 2 * h
        final_norm = 2 * h
        gated, lm_head_bias = False, True
    elif mt == "qwen":
        # Qwen (v1, remote code): fused c_attn with bias; config's intermediate_size is twice the MLP width.
        ff = inter // 2
        inter = ff
        linears = (
            LinearShape("attn.c_attn", "qkv", h, 3 * qd, True),
            LinearShape("attn.c_proj", "o", qd, h),
            LinearShape("mlp.w2", "gate", h, ff),
            LinearShape("mlp.w1", "up", h, ff),
            LinearShape("mlp.c_proj", "down", ff, h),
        )
        norm_params = 2 * norm
    else:  # pragma: no cover - guarded above
        raise ModelError(f"{where}: model_type '{mt}' is not supported")

    return ModelShape(
        name=name or str(cfg.get("_name_or_path") or mt), model_type=mt, hidden=h, layers=layers, heads=heads,
        kv_heads=kv, head_dim=head_dim, intermediate=inter, vocab=vocab, tied_embeddings=tied, linears=linears,
        norm_params_per_layer=norm_params, final_norm_params=final_norm, gated_mlp=gated,
        lm_head_bias=lm_head_bias,
        max_position=cfg.get("max_position_embeddings") or cfg.get("seq_length"),
        checkpoint_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"), source=source)


# ------------------------------------------------------------------------------------------------ catalogue
# The entries live in shardtune/model/catalogue.py (data); names resolve to them here.

_USER_CATALOGUE_ENV = "SHARDTUNE_MODEL_CATALOG"


# words of a hub name that do not change the shape: fine-tuned variants share their base model's config
_VARIANT_WORDS = {"hf", "instruct", "chat", "base", "it"}


def _norm_name(name: str) -> str:
    """Case/format-insensitive key: 'meta-llama/Meta-Llama-3-8B-Instruct' and 'llama3-8b' both give 'llama-3-8b';
    'mistralai/Mistral-7B-Instruct-v0.2' gives 'mistral-7b-v-0.2' (variant words anywhere, not only at the end)."""
    s = name.strip().lower().replace("_", "-").replace(" ", "-")
    s = s.rsplit("/", 1)[-1]
    s = "-".join(w for w in s.split("-") if w not in _VARIANT_WORDS)
    s = re.sub(r"^meta-", "", s)
    s = re.sub(r"([a-z])(\d)", r"\1-\2", s)   # llama3 -> llama-3, qwen2.5 -> qwen-2.5
    s = re.sub(r"-+", "-", s)
    return s


def _catalogue_index() -> dict[str, str]:
    idx: dict[str, str] = {}
    for key, entry in CATALOGUE.items():
        for alias in [key, *entry.get("aliases", [])]:
            idx.setdefault(_norm_name(alias), key)
    return idx


def catalogue_names() -> list[str]:
    _load_user_catalogue()
    return list(CATALOGUE)


def register_model(name: str, config: Mapping[str, Any], aliases: list[str] | tuple[str, ...] = (),
                   source: str = "user") -> ModelShape:
    """Add a model to the catalogue from a config.json-style dict; returns its shape (validated now)."""
    shape = shape_from_config(config, name=name, source=source)
    CATALOGUE[name] = dict(config=dict(config), aliases=list(aliases), source=source)
    return shape


def load_model_file(path: str | Path) -> ModelShape:
    """A YAML/JSON file: either a plain config.json, or {name:, aliases: [...], config: {...}}. Registers it."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ModelError(f"model file '{path}' is unreadable ({e.strerror}); pass a config.json or YAML file") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ModelError(f"model file '{path}' is not valid {p.suffix.lstrip('.').upper() or 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"model file '{path}' must hold a mapping (a config.json, or name/aliases/config)")
    if isinstance(data.get("config"), dict):
        name = str(data.get("name") or p.stem)
        return register_model(name, data["config"], data.get("aliases") or [], source=str(p))
    name = str(data.get("name") or data.get("_name_or_path") or p.stem)
    return register_model(name, data, [], source=str(p))


_loaded_user_paths: set[str] = set()


def _load_user_catalogue() -> None:
    """Models listed in $SHARDTUNE_MODEL_CATALOG (os.pathsep-separated YAML/JSON files or directories of them)."""
    raw = os.environ.get(_USER_CATALOGUE_ENV, "")
    for item in filter(None, raw.split(os.pathsep)):
        p = Path(item).expanduser()
        files = sorted(p.glob("*.json")) + sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
        for f in files:
            if str(f) in _loaded_user_paths:
                continue
            _loaded_user_paths.add(str(f))
            load_model_file(f)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{p} is unreadable ({e}); pass a Hugging Face model directory with config.json") from None


def _from_hub_cache(name: str) -> dict[str, Any] | None:
    """config.json of a hub id already in the local Hugging Face cache (never downloads)."""
    if name.count("/") != 1:
        return None
    # the cache location is read now, not at huggingface_hub's import, so HF_HUB_CACHE / HF_HOME set later count
    env = os.environ
    cache_dir = env.get("HF_HUB_CACHE") or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None)
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except Exception:
        return None
    if isinstance(path, str) and os.path.isfile(path):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def resolve_shape(name_or_path: str) -> ModelShape:
    """Shape of a local model dir, a YAML/JSON config file, a catalogue name, a cached hub id, or builtin:tiny-llama."""
    name = str(name_or_path).strip()
    if name.startswith("builtin:"):
        if name != "builtin:tiny-llama":
            raise ModelError(f"model '{name}' is not a built-in model; the built-in one is builtin:tiny-llama")
        return shape_from_config(TINY_LLAMA, name=name, source="shardtune.builtin.tiny_model (quickstart)")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model directory '{name}' has no config.json; pass a Hugging Face model directory")
        return shape_from_config(read_config_json(p), name=p.name, source=str(p / "config.json"))
    if p.is_file():
        return load_model_file(p)
    # a hub id already downloaded: its own config.json is exact (the catalogue shares shapes across variants)
    cached = _from_hub_cache(name)
    if cached is not None:
        return shape_from_config(cached, name=name, source=f"hub cache: {name}/config.json")
    _refuse_moe_name(name)
    _load_user_catalogue()
    key = _catalogue_index().get(_norm_name(name))
    if key is not None:
        entry = CATALOGUE[key]
        return shape_from_config(entry["config"], name=key, source=entry.get("source", "catalogue"))
    raise ModelError(
        f"model '{name}' is not a local directory, a config file, a downloaded hub id or a catalogue name"
        f"{_close_models(name)}. Pass a directory with config.json, a YAML/JSON config file, or list such files in "
        f"${_USER_CATALOGUE_ENV}")


def _close_models(name: str) -> str:
    import difflib
    index = _catalogue_index()
    near = difflib.get_close_matches(_norm_name(name), list(index), n=6, cutoff=0.6)
    keys = list(dict.fromkeys(index[n] for n in near))
    return f" (close: {', '.join(keys)})" if keys else f"; known: {', '.join(CATALOGUE)}"


# mixture-of-experts families: every token's expert choice changes what is resident and gathered, which the planner
# does not model; refuse by name (and by model_type in shape_from_config) instead of planning a dense model
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe", "jamba",
                   "granitemoe", "phimoe", "llama4")
_MOE_NAME = re.compile(r"(mixtral|moe|deepseek-(v2|v3|r1)(?!-distill)|-a\d+(\.\d+)?b\b|dbrx|jamba)", re.I)


def _refuse_moe_name(name: str) -> None:
    if _MOE_NAME.search(name.rsplit("/", 1)[-1]):
        raise ModelError(f"model '{name}' is a mixture-of-experts model; the planner models dense decoders only "
                         "(experts, routing and expert parallelism are not counted). Plan a dense model of the same "
                         "total parameter count for an upper bound on weights, or measure with a short run")
