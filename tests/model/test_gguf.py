"""GGUF sources: a tiny llama GGUF written here with the `gguf` package (byte-level BPE vocab, ChatML template, one
Q8_0 tensor) is dequantized into a cached HF directory, trains two steps through `shardtune train`, and its adapter
loads again for inference from the recorded base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from shardtune.errors import EnvironmentProblem, ModelError  # noqa: E402
from shardtune.model.gguf import SOURCE_FILE, dequantized_model_dir, gguf_source  # noqa: E402
from support import alpaca_records  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (printable Latin-1 bytes stand for themselves, the rest shift to 256+),
    the alphabet byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted, symbols = 0, []
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama with a 260-token byte vocab; returns the weights written, by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    sym = _byte_symbols()
    merged = sym[ord(" ")] + sym[ord("t")]
    tokens = SPECIALS + sym + [merged]  # one merge (" t"), so the merges table is exercised too
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * 257)
    w.add_token_merges([f"{sym[ord(' ')]} {sym[ord('t')]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    kv = HIDDEN // HEADS * KV_HEADS
    written: dict[str, np.ndarray] = {}

    def put(name: str, shape: tuple[int, ...], scale: float = 0.02, quant=None):
        arr = (rng.standard_normal(shape) * scale).astype(np.float32) if scale else np.ones(shape, np.float32)
        written[name] = arr
        if quant is None:
            w.add_tensor(name, arr)
        else:  # stored in blocks; transformers must dequantize it
            packed = gguf.quants.quantize(arr, quant)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=quant)

    put("token_embd.weight", (vocab, HIDDEN))
    for i in range(LAYERS):
        put(f"blk.{i}.attn_norm.weight", (HIDDEN,), scale=0)
        put(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), quant=gguf.GGMLQuantizationType.Q8_0 if i == 0 else None)
        put(f"blk.{i}.attn_k.weight", (kv, HIDDEN))
        put(f"blk.{i}.attn_v.weight", (kv, HIDDEN))
        put(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN))
        put(f"blk.{i}.ffn_norm.weight", (HIDDEN,), scale=0)
        put(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        put(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        put(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    put("output_norm.weight", (HIDDEN,), scale=0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny-test.Q8_0.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


def _mcfg(name, gguf_file=None):
    return SimpleNamespace(name_or_path=str(name), gguf_file=gguf_file)


def test_gguf_dequantizes_to_cached_hf_dir(tiny_gguf):
    path, written = tiny_gguf
    out = dequantized_model_dir(gguf_source(_mcfg(path)))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == ("llama", 2, 64, 260)
    assert json.loads((out / SOURCE_FILE).read_text())["gguf_file"] == str(path.resolve())

    from safetensors.torch import load_file
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    emb = torch.from_numpy(written["token_embd.weight"])
    torch.testing.assert_close(sd["model.embed_tokens.weight"].float(), emb, rtol=8e-3, atol=1e-6)
    down = torch.from_numpy(written["blk.1.ffn_down.weight"])
    torch.testing.assert_close(sd["model.layers.1.mlp.down_proj.weight"].float(), down, rtol=8e-3, atol=1e-6)
    # llama.cpp stores q/k rows permuted for its rope layout and transformers undoes that; compare as row sets.
    # Q8_0 keeps 8 bits per weight with one scale per 32: error below 1% of each block's largest value.
    q = sd["model.layers.0.self_attn.q_proj.weight"].float()
    ref = torch.from_numpy(written["blk.0.attn_q.weight"])
    assert q.shape == ref.shape
    q_sorted, ref_sorted = q.sort(dim=0).values, ref.sort(dim=0).values
    assert (q_sorted - ref_sorted).abs().max() < 0.01 * ref.abs().max()
    assert not torch.equal(q, torch.zeros_like(q))

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "SELECT count(*) FROM singer"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                     add_generation_prompt=True)

    stamp = (out / "model.safetensors").stat().st_mtime_ns  # a second resolve reuses the cache
    assert dequantized_model_dir(path) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert gguf_source(_mcfg(path.parent, gguf_file=path.name)) == path  # directory + model.gguf_file


def test_gguf_errors_are_one_line(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    with pytest.raises(ModelError, match="does not exist"):
        gguf_source(_mcfg(path.with_name("missing.gguf")))
    with pytest.raises(ModelError, match="gguf_file=x.gguf needs model.name_or_path to be the directory"):
        gguf_source(_mcfg(path, gguf_file="x.gguf"))
    assert gguf_source(_mcfg("builtin:tiny-llama")) is None
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the extra was not installed
    with pytest.raises(EnvironmentProblem, match=r"pip install 'shardtune\[gguf\]'"):
        dequantized_model_dir(path)
    monkeypatch.undo()
    bad = path.with_name("bad.gguf")
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv("SHARDTUNE_CACHE", str(path.parent.parent / "cache"))
    with pytest.raises(ModelError, match="cannot load GGUF file"):
        dequantized_model_dir(bad)


def _shardtune(*args: str, env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("shardtune")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "shardtune.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_train_two_steps_from_gguf_then_load_adapter(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = tmp_path / "data.json"
    data.write_text(json.dumps(alpaca_records(16)))
    run = tmp_path / "run"
    env = {**os.environ, "SHARDTUNE_CACHE": os.environ["SHARDTUNE_CACHE"]}
    res = _shardtune("train", f"model.name_or_path={path}", f"data.path={data}", f"output.dir={run}",
                     "train.method=lora", "train.device=cpu", "train.max_steps=2", "train.micro_batch_size=4",
                     "train.warmup_steps=0", "train.lr=1e-2", "train.eval_every=0", "data.max_seq_len=96",
                     "data.val_fraction=0", "output.plot=false", "lora.rank=4", "lora.alpha=8", env=env)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    recorded = json.loads((run / "shardtune_run.json").read_text())["base_model_dir"]
    assert recorded == str(dequantized_model_dir(path).resolve())

    from shardtune.export.adapter import load_for_inference
    model, tok = load_for_inference(run, device="cpu")
    assert type(model).__name__ == "PeftModelForCausalLM"
    ids = tok("SELECT name FROM singer", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (tuned - base).abs().max() > 1e-4  # two steps at lr 1e-2 moved the adapter off its zero init

    # the cache cleared (or the run copied to another machine): the run's GGUF is dequantized again
    shutil.rmtree(recorded)
    again, _ = load_for_inference(run, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, tuned)
    from shardtune.export.adapter import load_run
    assert load_run(run, base=str(path)).base_model == recorded  # --base FILE.gguf


def test_gguf_base_quantizes_to_nf4_for_qlora(tiny_gguf):
    """method=qlora re-quantizes the dequantized GGUF weights to NF4 like any bf16 checkpoint."""
    pytest.importorskip("bitsandbytes")
    from shardtune.config import load_config
    from shardtune.model.load import build_model, resolve_model_dir
    path, _ = tiny_gguf
    cfg = load_config(None, [f"model.name_or_path={path}", "train.method=qlora", "train.device=cpu",
                             "lora.rank=4", "lora.alpha=8"])
    model = build_model(cfg, resolve_model_dir(cfg.model), torch.device("cpu"), torch.float32)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds
    ids = torch.tensor([[5, 6, 7, 8]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters() if p.requires_grad)
