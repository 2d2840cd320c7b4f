"""Published runs and how the planner predicts them: prints the rows of docs/planner.md's "Published vs predicted"
table. Run from the repository root: `python tests/plan/published_runs.py`. Sources and profiles: see that section."""

from __future__ import annotations

from shardtune.config import load_config
from shardtune.hardware import GiB, parse_gpus
from shardtune.plan import estimate

QL = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "paged_adamw_32bit"}   # qlora.py of the QLoRA paper
AA = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "adamw"}               # fsdp_qlora train.py, bf16
GUANACO = ["train.method=qlora", "lora.rank=64", "lora.dropout=0.05", "data.max_seq_len=528",
           "train.micro_batch_size=1", "train.gradient_checkpointing=true", "train.precision=bf16"]
AA_COMMON = ["lora.rank=64", "lora.dropout=0.1", "train.gradient_checkpointing=true", "train.precision=bf16",
             "data.max_seq_len=2048"]


def _aa(method, strategy, micro, offload=False, ctx=2048):
    return [*AA_COMMON, f"train.method={method}", f"parallel.strategy={strategy}", f"train.micro_batch_size={micro}",
            f"data.max_seq_len={ctx}", f"parallel.offload_param={str(offload).lower()}"]


# (source, label, model, gpus, overrides, profile, published peak reserved GiB or None when only "it ran")
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
    ("AA", "Llama-2-7B, 2x4090, \"DDP\" qlora bs8 ctx 2048", "Llama-2-7B", "2xRTX4090", _aa("qlora", "ddp", 8), AA, 20.94),
    ("AA", "Llama-2-7B, 2x4090, \"DDP\" lora bs4 ctx 2048", "Llama-2-7B", "2xRTX4090", _aa("lora", "ddp", 4), AA, 22.04),
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


def predict(case):
    _, _, model, gpus, overrides, profile, _ = case
    return estimate(load_config(None, [f"model.name_or_path={model}", *overrides]), parse_gpus(gpus), stack=profile)


def main() -> None:
    for case in CASES:
        source, label, *_, published = case
        e = predict(case)
        m = e.memory
        err = f"{m.peak_reserved / GiB / published - 1:+.1%}" if published else ""
        verdict = ("fits (tight)" if e.tight else "fits") if e.fits else \
            f"does not fit (device {m.usage_vs_budget / GiB:.1f} of {m.budget / GiB:.1f})"
        print(f"| {source} | {label} | {published or 'ran'} | {m.peak_reserved / GiB:.2f} | {err} | {verdict} |")


if __name__ == "__main__":
    main()
