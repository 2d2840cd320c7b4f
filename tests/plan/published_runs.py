"""Published runs and how the planner predicts them: prints the rows of docs/planner.md's "Published vs predicted"
table and its summary. Run from the repository root: `python tests/plan/published_runs.py`. Sources and profiles:
see that section. A case's published value is its peak reserved in GiB, None when the source only says it ran, or
"OOM" when the source says it ran out of memory."""

from __future__ import annotations

import math

from shardtune.config import load_config
from shardtune.hardware import GiB, parse_gpus
from shardtune.plan import estimate

QL = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "paged_adamw_32bit"}   # qlora.py of the QLoRA paper
# fsdp_qlora train.py, bf16. Its loop keeps `output` until after loss.backward(), which would keep the fp32 logits
# through backward (profile field keeps_output), but the source's own allocated figures (LoRA bs1: 8.28 -> 9.16 GiB
# from 512 to 2048 tokens) grow by less than that term adds (+0.92 GiB without it, +1.10 with): not applied.
AA = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "adamw"}
AA_NO_SHARD = {**AA, "fsdp_no_shard": True}   # its "DDP": FSDP with ShardingStrategy.NO_SHARD
GUANACO = ["train.method=qlora", "lora.rank=64", "lora.dropout=0.05", "data.max_seq_len=528",
           "train.micro_batch_size=1", "train.gradient_checkpointing=true", "train.precision=bf16"]
AA_COMMON = ["lora.rank=64", "lora.dropout=0.1", "train.gradient_checkpointing=true", "train.precision=bf16",
             "data.max_seq_len=2048"]


def _aa(method, strategy, micro, offload=False, ctx=2048):
    return [*AA_COMMON, f"train.method={method}", f"parallel.strategy={strategy}", f"train.micro_batch_size={micro}",
            f"data.max_seq_len={ctx}", f"parallel.offload_param={str(offload).lower()}"]


# (source, label, model, gpus, overrides, profile, published peak reserved GiB | None ("ran") | "OOM")
CASES = [
    ("QL", "LLaMA-65B, 1x 48 GB, qlora bs1 seq 528", "huggyllama/llama-65b", "1x48GB", GUANACO, QL, None),
    ("QL", "LLaMA-33B, 1x 24 GB, qlora bs1 seq 528", "huggyllama/llama-30b", "1x24GB", GUANACO, QL, None),
    ("AA", "Llama-2-7B, 2x3090, FSDP qlora bs1 ctx 512", "Llama-2-7B", "2xRTX3090", _aa("qlora", "fsdp", 1, ctx=512), AA, 4.98),
    ("AA", "Llama-2-7B, 2x3090, FSDP qlora bs1 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("qlora", "fsdp", 1), AA, 5.21),
    ("AA", "Llama-2-7B, 2x3090, FSDP lora bs1 ctx 512", "Llama-2-7B", "2xRTX3090", _aa("lora", "fsdp", 1, ctx=512), AA, 10.24),
    ("AA", "Llama-2-7B, 2x3090, FSDP lora bs1 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("lora", "fsdp", 1), AA, 10.22),
    ("AA", "Llama-2-7B, 2x3090, FSDP qlora bs4 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("qlora", "fsdp", 4), AA, 11.22),
    ("AA", "Llama-2-7B, 2x3090, FSDP qlora bs10 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("qlora", "fsdp", 10), AA, 20.97),
    ("AA", "Llama-2-7B, 2x3090, FSDP lora bs4 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("lora", "fsdp", 4), AA, 16.14),
    ("AA", "Llama-2-7B, 2x3090, FSDP lora bs6 ctx 2048", "Llama-2-7B", "2xRTX3090", _aa("lora", "fsdp", 6), AA, 21.35),
    ("AA", "Llama-2-7B, 2x4090, \"DDP\" qlora bs8 ctx 2048", "Llama-2-7B", "2xRTX4090", _aa("qlora", "ddp", 8), AA_NO_SHARD, 20.94),
    ("AA", "Llama-2-7B, 2x4090, \"DDP\" lora bs4 ctx 2048", "Llama-2-7B", "2xRTX4090", _aa("lora", "ddp", 4), AA_NO_SHARD, 22.04),
    ("AA", "Llama-2-7B, 2x4090, FSDP offload lora bs10 ctx 2048", "Llama-2-7B", "2xRTX4090",
     _aa("lora", "fsdp", 10, True), AA, 22.69),
    ("AA", "Llama-2-7B, 2x4090, FSDP offload qlora bs12 ctx 2048", "Llama-2-7B", "2xRTX4090",
     _aa("qlora", "fsdp", 12, True), AA, 22.38),
    ("AA", "Yi-34B, 2x4090, FSDP qlora bs2 ctx 2048", "Yi-34B", "2xRTX4090", _aa("qlora", "fsdp", 2), AA, 23.05),
    ("AA", "Yi-34B, 2x4090, FSDP offload qlora bs4 ctx 2048", "Yi-34B", "2xRTX4090", _aa("qlora", "fsdp", 4, True), AA, 22.98),
    ("AA", "Llama-2-70B, 2x4090, FSDP offload qlora bs2 ctx 2048", "Llama-2-70B", "2xRTX4090",
     _aa("qlora", "fsdp", 2, True), AA, 14.92),
    ("AA", "Mistral-7B v0.2, 2x4090, FSDP offload qlora bs12 ctx 2048", "mistralai/Mistral-7B-v0.2", "2xRTX4090",
     _aa("qlora", "fsdp", 12, True), AA, 22.54),
    ("AA", "Mistral-7B v0.2, 2x4090, FSDP offload qlora bs1 ctx 24576", "mistralai/Mistral-7B-v0.2", "2xRTX4090",
     _aa("qlora", "fsdp", 1, True, ctx=24576), AA, 22.54),
] + [("AA", f"Llama-2-70B, {g}, FSDP qlora bs{mb} ctx 2048", "Llama-2-70B", g, _aa("qlora", "fsdp", mb), AA, None)
     for g, mb in [("4xA5000", 1), ("8xA5000", 1), ("2xRTX6000Ada", 2), ("4xRTX6000Ada", 3), ("2xA100-40GB", 1),
                   ("4xA100-40GB", 4), ("8xA100-40GB", 4), ("4xH100", 8)]]



# Qwen (v1) README, "Profiling of Memory and Speed" (github.com/QwenLM/Qwen README.md): one A100-SXM4-80G, batch 1,
# flash attention 2, finetune.py (HF Trainer + peft: LoRA r=64, alpha 16, dropout 0.05 on c_attn, c_proj, w1, w2 =
# every linear; bf16; gradient checkpointing; AdamW); "LoRA (emb)" also trains wte and lm_head (modules_to_save).
# The README's "G" is read as 10^9 bytes (converted to GiB here).
QW = {"stack": "hf", "lora_dtype": "fp32", "optimizer": "adamw"}
QW_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QW_PUBLISHED = {("Qwen-7B", ""): (20.1, 20.4, 21.5, 23.8, 29.7, 36.6),
                ("Qwen-7B", " (emb)"): (33.7, 34.1, 35.2, 35.1, 39.2, 48.5),
                ("Qwen-14B", ""): (34.6, 35.1, 35.3, 37.4, 42.5, 55.2),
                ("Qwen-14B", " (emb)"): (51.2, 51.1, 51.5, 54.1, 56.8, 67.7)}


def _qw(seq, emb):
    return ["train.method=lora", "lora.rank=64", "lora.alpha=16", "lora.dropout=0.05", "train.micro_batch_size=1",
            "train.gradient_checkpointing=true", "train.precision=bf16", f"data.max_seq_len={seq}",
            "parallel.strategy=none"] + (["lora.modules_to_save=[wte,lm_head]"] if emb else [])


CASES += [("QW", f"{model}, 1x A100 80GB, lora{emb} bs1 seq {seq}", model, "1xA100-80GB", _qw(seq, emb), QW,
           round(gb * 1e9 / GiB, 2))
          for (model, emb), values in QW_PUBLISHED.items() for seq, gb in zip(QW_LENGTHS, values)]

# Unsloth README, "Llama 3.1 (8B) max. context length" / "Llama 3.3 (70B)" (github.com/unslothai/unsloth
# README.md), the "Hugging Face + FA2" column: 4-bit QLoRA on all linear layers, r=32, batch 1, sequences padded to
# the length; the longest context that ran on each VRAM size, or OOM. Planned as the HF stack (fp32 LoRA, peft's
# kbit upcast, full-logits loss) with 8-bit AdamW (Unsloth's notebooks' optim); OOM rows at 512 tokens.
US = {"stack": "hf", "lora_dtype": "fp32", "optimizer": "adamw_8bit"}


def _us(seq):
    return ["train.method=qlora", "lora.rank=32", "lora.dropout=0", "train.micro_batch_size=1",
            "train.gradient_checkpointing=true", "train.precision=bf16", f"data.max_seq_len={seq}",
            "parallel.strategy=none"]


CASES += [("US", f"Llama-3.1-8B, 1x {gb} GB, qlora bs1 ctx {ctx or 512}", "Llama-3.1-8B", f"1x{gb}GB",
           _us(ctx or 512), US, None if ctx else "OOM")
          for gb, ctx in ((8, 0), (12, 932), (16, 2551), (24, 5789), (40, 12264), (48, 15502), (80, 28454))]
CASES += [("US", "Llama-3.3-70B, 1x 48 GB, qlora bs1 ctx 512", "Llama-3.3-70B", "1x48GB", _us(512), US, "OOM"),
          ("US", "Llama-3.3-70B, 1x A100 80GB, qlora bs1 ctx 6916", "Llama-3.3-70B", "1xA100-80GB", _us(6916), US,
           None)]

# CPU RAM of the machines, where the source states it (offload plans need it): Answer.AI's 2x3090 and 2x4090 boxes
CPU_RAM_GIB = {("AA", "2xRTX3090"): 128, ("AA", "2xRTX4090"): 128}


def predict(case):
    source, _, model, gpus, overrides, profile, _ = case
    ram = CPU_RAM_GIB.get((source, gpus))
    return estimate(load_config(None, [f"model.name_or_path={model}", *overrides]),
                    parse_gpus(gpus, cpu_ram_bytes=ram * GiB if ram else None), stack=profile)


def verdict_ok(case, est) -> bool:
    """A run that ran is 'fits'; a published OOM is 'does not fit'."""
    return (not est.fits) if case[-1] == "OOM" else est.fits


def rows():
    """(case, estimate, error of peak reserved or None) for every case."""
    out = []
    for case in CASES:
        est = predict(case)
        pub = case[-1]
        err = est.memory.peak_reserved / GiB / pub - 1 if isinstance(pub, float) else None
        out.append((case, est, err))
    return out


def main() -> None:
    table = rows()
    for case, e, err in table:
        source, label, *_, published = case
        m = e.memory
        verdict = ("fits (tight)" if e.tight else "fits") if e.fits else \
            f"does not fit (device {m.usage_vs_budget / GiB:.1f} of {m.budget / GiB:.1f})"
        mark = "" if verdict_ok(case, e) else " **wrong**"
        pub = published if published is not None else "ran"
        print(f"| {source} | {label} | {pub} | {m.peak_reserved / GiB:.2f} | "
              f"{'' if err is None else f'{err:+.1%}'} | {verdict}{mark} |")
    errs = [err for _, _, err in table if err is not None]
    ok = sum(verdict_ok(c, e) for c, e, _ in table)
    print(f"\n{len(table)} cases from {len({c[0] for c in CASES})} sources; verdicts right: {ok}/{len(table)}; "
          f"{len(errs)} reserved figures: {sum(abs(x) <= 0.10 for x in errs)} within 10%, "
          f"{sum(abs(x) <= 0.15 for x in errs)} within 15%, worst {max(errs, key=abs):+.1%}, "
          f"mean |error| {sum(map(abs, errs)) / len(errs):.1%}")
    assert not any(math.isnan(x) for x in errs)


if __name__ == "__main__":
    main()
