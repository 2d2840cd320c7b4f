"""Build the built-in tiny Llama's shipped base weights, once, offline: `python -m shardtune.builtin.pretrain_base`.

A randomly initialised 4-layer, 128-wide Llama cannot learn to copy a value from a question into its SQL in the
quickstart's few hundred CPU steps (docs/cpu.md). This script pretrains it, in full precision, on generic copying
lines (shardtune.builtin.copy_corpus: random words, a value, a separator, the value again; never a toy question or
query) so the quickstart's QLoRA fine-tune starts from a base that already copies. It writes the model, its
tokenizer (trained on the toy set's training records only) and base.json (settings, probe score, file hashes) into
shardtune/assets/tiny-llama, which the package ships. Seeded; the recorded hashes are checked on every load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"
MANIFEST = "base.json"
SETTINGS = dict(seed=0, steps=1500, rows_per_step=32, row_tokens=128, lr=3e-3, warmup_steps=100, min_lr_ratio=0.1,
                tokenizer_vocab_limit=1024, probe_lines=200)


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in the model directory except the manifest itself."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def _line_ids(tok, rng, fillers, values):
    from shardtune.builtin.copy_corpus import copy_line
    prefix, target = copy_line(rng, fillers, values)
    return (tok(prefix, add_special_tokens=False).input_ids, tok(target, add_special_tokens=False).input_ids)


def packed_batch(tok, rng, fillers, values, rows: int, row_tokens: int):
    """(input_ids, labels): each row packs copying lines, separated by newlines, up to row_tokens; labels are the
    targets' tokens only (-100 elsewhere), so the loss is the copying alone."""
    import torch
    newline = tok("\n", add_special_tokens=False).input_ids
    ids = torch.full((rows, row_tokens), tok.pad_token_id)
    labels = torch.full((rows, row_tokens), -100)
    for r in range(rows):
        pos = 0
        while True:
            prefix, target = _line_ids(tok, rng, fillers, values)
            line = prefix + target + newline
            if pos + len(line) > row_tokens:
                break
            ids[r, pos:pos + len(line)] = torch.tensor(line)
            labels[r, pos + len(prefix):pos + len(prefix) + len(target)] = torch.tensor(target)
            pos += len(line)
    return ids, labels


def probe_copy_rate(model, tok, fillers, values, lines: int, seed: int) -> float:
    """Share of fresh lines (another seed) whose every target token is the model's top choice, i.e. greedy decoding
    would copy the values exactly."""
    import torch
    rng = random.Random(seed)
    right = 0
    with torch.no_grad():
        for _ in range(lines):
            prefix, target = _line_ids(tok, rng, fillers, values)
            logits = model(torch.tensor([prefix + target])).logits[0]
            guess = logits[len(prefix) - 1:len(prefix) + len(target) - 1].argmax(-1).tolist()
            right += guess == target
    return right / lines


def pretrain_copying(model, tok, fillers, values, s: dict, log_every: int) -> float:
    """AdamW with warmup and cosine decay on packed copying lines; returns the last step's copy loss."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.9, 0.95), weight_decay=0.0)

    def lr_at(step):
        if step < s["warmup_steps"]:
            return s["lr"] * (step + 1) / s["warmup_steps"]
        frac = (step - s["warmup_steps"]) / max(1, s["steps"] - s["warmup_steps"])
        return s["lr"] * (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = random.Random(s["seed"])
    start, loss = time.time(), torch.tensor(float("nan"))
    model.train()
    for step in range(s["steps"]):
        ids, labels = packed_batch(tok, rng, fillers, values, s["rows_per_step"], s["row_tokens"])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{s['steps']}  copy loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)
    return loss.item()


def build_base(out_dir: Path = ASSET_DIR, log_every: int = 100, **overrides) -> dict:
    """Pretrain the base with SETTINGS (updated by `overrides`, e.g. steps=3 for a test) and write it to out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shardtune.builtin.copy_corpus import filler_words, value_words
    from shardtune.builtin.tiny_model import ARCH_CONFIGS, BUILTIN_SHAPE, build_tokenizer
    from shardtune.builtin.toy_sql import builtin_corpus

    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown pretraining settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    s = {**SETTINGS, **{k: v for k, v in overrides.items() if v is not None}}
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ValueError(f"{out_dir} holds files but no {MANIFEST}; pass an empty or new directory (or a base's)")
    tok = build_tokenizer(builtin_corpus(), vocab_size=s["tokenizer_vocab_limit"], word_tokens=True)
    shape = {**ARCH_CONFIGS[BUILTIN_SHAPE["arch"]],
             **{k: v for k, v in BUILTIN_SHAPE.items() if k != "arch"}}
    if len(tok) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} entries, above BUILTIN_SHAPE's vocab_size {shape['vocab_size']}")
    cfg = AutoConfig.for_model(shape.pop("model_type"), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(s["seed"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fillers, values = filler_words(tok.get_vocab()), value_words()
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # the float rounding, hence the weights' hash, depends on the thread count
    try:
        loss = pretrain_copying(model, tok, fillers, values, s, log_every)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    rate = probe_copy_rate(model, tok, fillers, values, s["probe_lines"], seed=s["seed"] + 1)
    print(f"probe: copies {rate:.0%} of {s['probe_lines']} fresh lines exactly", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # a previous base is replaced whole (checked before training: never other files)
        old.unlink()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    manifest = {"what": "shardtune's built-in tiny Llama: generic copying pretraining, see shardtune/builtin/"
                        "pretrain_base.py and docs/cpu.md", "settings": s, "final_copy_loss": round(loss, 4),
                "probe_copy_rate": rate, "parameters": sum(p.numel() for p in model.parameters()),
                "tokenizer_entries": len(tok), "torch": torch.__version__, "threads": 1,
                "seconds": round(time.time() - start, 1), "sha256": file_hashes(out_dir)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardtune.builtin.pretrain_base", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="where to write the base (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help=f"pretraining steps (default {SETTINGS['steps']})")
    a = p.parse_args(argv)
    m = build_base(a.out, steps=a.steps)
    print(f"wrote {a.out}: {m['parameters']:,} parameters, model.safetensors sha256 {m['sha256']['model.safetensors']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
