"""`--stack hf`: the HF Trainer + peft + bitsandbytes stack as a planner profile, checked against published runs
(docs/planner.md, "Published vs predicted")."""

from __future__ import annotations

import argparse

import pytest

from shardtune.config import load_config
from shardtune.errors import ConfigError
from shardtune.hardware import GiB, parse_gpus
from shardtune.plan import command, estimate

QLORA_SCRIPT = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "paged_adamw_32bit"}   # the QLoRA paper's qlora.py
PURE_BF16 = {"stack": "hf", "lora_dtype": "bf16", "optimizer": "adamw"}    # Answer.AI fsdp_qlora train.py, bf16
GUANACO = ["train.method=qlora", "lora.rank=64", "lora.dropout=0.05", "data.max_seq_len=528",
           "train.micro_batch_size=1", "train.gradient_checkpointing=true", "train.precision=bf16"]


def _est(model, gpus, overrides, stack):
    return estimate(load_config(None, [f"model.name_or_path={model}", *overrides]), parse_gpus(gpus), stack=stack)


@pytest.mark.parametrize("model, gpus", [("huggyllama/llama-65b", "1x48GB"), ("huggyllama/llama-30b", "1x24GB")])
def test_the_qlora_papers_headline_runs_fit(model, gpus):
    """QLoRA (Dettmers et al. 2023): a 65B model fine-tuned on one 48 GB GPU, 33B on one 24 GB GPU."""
    est = _est(model, gpus, GUANACO, QLORA_SCRIPT)
    assert est.fits, est.why_not()
    # shardtune's own stack on the 24 GB card is over the device: the profiles differ where they should
    if gpus == "1x24GB":
        assert not _est(model, gpus, GUANACO, None).fits


def test_hf_stack_terms_differ_from_shardtunes_where_the_stacks_do():
    base = ["train.method=qlora", "data.max_seq_len=2048", "train.micro_batch_size=2",
            "train.gradient_checkpointing=true", "train.kernels=liger"]
    ours = _est("llama-3-8b", "1xH100", base, None)
    hf = _est("llama-3-8b", "1xH100", base, {"stack": "hf", "lora_dtype": "fp32", "optimizer": None})
    hf16 = _est("llama-3-8b", "1xH100", base, QLORA_SCRIPT)
    assert (ours.setup.kernels, ours.setup.fused_loss) == ("liger", "liger")
    assert (hf.setup.kernels, hf.setup.fused_loss) == ("none", "none")          # no Liger, full logits
    # prepare_model_for_kbit_training upcasts every non-quantized parameter to fp32: twice shardtune's bf16 bytes
    assert hf.memory.weights.non_quantized == pytest.approx(2 * ours.memory.weights.non_quantized, rel=1e-3)
    # the QLoRA script casts embeddings and head back to bf16 and the LoRA weights too
    assert hf16.memory.gpu["LoRA weights (bf16)"] * 2 == hf.memory.gpu["LoRA weights (fp32)"]
    assert hf16.memory.weights.non_quantized < hf.memory.weights.non_quantized
    assert hf.memory.gpu["logits / loss"] > 10 * ours.memory.gpu.get("logits / loss", 0)


def test_paged_optimizer_states_page_out_instead_of_overflowing():
    tight = ["train.method=lora", "data.max_seq_len=512", "train.micro_batch_size=1",
             "train.gradient_checkpointing=true", "lora.rank=256"]
    paged = {"stack": "hf", "lora_dtype": "fp32", "optimizer": "paged_adamw_32bit"}
    plain = {"stack": "hf", "lora_dtype": "fp32", "optimizer": "adamw"}
    full = _est("llama-3-8b", "1xH100", tight, plain).memory
    budget_gib = (full.usage_vs_budget - full.gpu["optimizer states"] / 2) / GiB
    over = _est("llama-3-8b", f"1x{budget_gib:.2f}GB", tight, plain)
    spilled = _est("llama-3-8b", f"1x{budget_gib:.2f}GB", tight, paged)
    assert not over.fits and spilled.fits
    assert 0 < spilled.memory.cpu["optimizer states (paged out)"] < full.gpu["optimizer states"]
    assert any("paged to CPU memory" in n for n in spilled.notes)


@pytest.mark.parametrize("method, mb, ctx, published_gib", [
    ("qlora", 1, 512, 4.98), ("lora", 1, 512, 10.24), ("qlora", 4, 2048, 11.22), ("lora", 4, 2048, 16.14),
    ("qlora", 10, 2048, 20.97), ("lora", 6, 2048, 21.35)])
def test_answer_ai_2x3090_llama2_7b_fsdp_reserved(method, mb, ctx, published_gib):
    """Answer.AI fsdp_qlora benchmarks_03_2024.md (2x RTX 3090, FSDP, pure bf16, LoRA r=64, checkpointing): peak
    reserved within 10% (these rows; the full table with its misses is in docs/planner.md)."""
    est = _est("meta-llama/Llama-2-7b-hf", "2xRTX3090",
               [f"train.method={method}", "parallel.strategy=fsdp", f"train.micro_batch_size={mb}",
                f"data.max_seq_len={ctx}", "lora.rank=64", "lora.dropout=0.1", "train.gradient_checkpointing=true",
                "train.precision=bf16"], PURE_BF16)
    assert est.fits
    assert est.memory.peak_reserved / GiB == pytest.approx(published_gib, rel=0.10)


def test_stack_flags_through_the_command(capsys):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    argv = ["--model", "llama-65b", "--gpus", "1x48GB", "--method", "qlora", "--seq", "528", "--micro-batch", "1",
            "--grad-ckpt", "on", "lora.rank=64"]
    assert command.run(p.parse_args(argv + ["--stack", "hf", "--lora-dtype", "bf16", "--optim",
                                            "paged_adamw_32bit"])) == 0
    assert "stack=hf(lora bf16, paged_adamw_32bit)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="add --stack hf"):
        command.run(p.parse_args(argv + ["--lora-dtype", "bf16"]))


def test_every_published_run_without_a_figure_is_called_fits():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from published_runs import CASES, predict
    ran = [c for c in CASES if c[-1] is None]
    assert len(ran) >= 10
    for case in ran:
        est = predict(case)
        assert est.fits, (case[1], est.why_not())


def test_published_table_sources_verdicts_and_errors():
    """docs/planner.md's published-vs-predicted table: at least 4 independent sources and 15 cases; every wrong
    verdict and every reserved figure off by more than 15% is one of the known, documented misses (fixing one means
    updating the docs and this list)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from published_runs import rows, verdict_ok
    table = rows()
    assert len({c[0] for c, _, _ in table}) >= 4 and len(table) >= 15
    wrong = {c[1] for c, e, _ in table if not verdict_ok(c, e)}
    assert wrong == set()
    off = {c[1] for c, _, err in table if err is not None and abs(err) > 0.15}
    assert off == {"Llama-2-7B, 2x3090, FSDP qlora bs1 ctx 2048",
                   "Qwen-7B, 1x A100 80GB, lora (emb) bs1 seq 2048"}
    # the sources added for issue 15 (Qwen's profile, Unsloth's table): every verdict right
    qw = [err for c, _, err in table if c[0] == "QW"]
    # (Qwen-7B "LoRA (emb)" at 2,048 tokens is +15.1% since the HF loss cache measured on our own peer was added)
    assert len(qw) == 24 and all(abs(x) <= 0.16 for x in qw) and sum(abs(x) > 0.15 for x in qw) == 1


def test_hf_fsdp_keeps_the_root_units_embeddings_gathered():
    """The HF stack's FSDP wrapping leaves the embeddings in the root unit with the head, which FSDP keeps gathered
    from its forward to the end of backward; shardtune shards the embeddings as their own unit. Tied embeddings are
    the head already."""
    from shardtune.model.shapes import resolve_shape
    base = ["train.method=qlora", "parallel.strategy=fsdp", "train.micro_batch_size=1", "data.max_seq_len=2048"]
    for model, tied in (("Llama-2-7B", False), ("Llama-3.2-3B", True)):
        shape = resolve_shape(model)
        assert shape.tied_embeddings is tied
        hf = _est(model, "2xRTX4090", base, PURE_BF16).memory.gpu["comm: gathered params (fsdp/zero3)"]
        ours = _est(model, "2xRTX4090", base, None).memory.gpu["comm: gathered params (fsdp/zero3)"]
        extra = 0 if tied else 2 * shape.vocab * shape.hidden
        # the rest of the gathered bytes agree to within the LoRA weights' dtype (bf16 here, fp32 in shardtune)
        assert hf - ours == pytest.approx(extra, abs=2 ** 20)
