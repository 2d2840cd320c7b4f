"""Spider text-to-SQL on a real pretrained model (SmolLM2-135M-Instruct from its GGUF): the base model, shardtune's
LoRA and the Hugging Face peer's LoRA (transformers Trainer + peft), side by side on held-out databases.

Both trainers get the same split (whole databases, shardtune.data.split), the same tokenized samples (prompt in the
model's chat template, loss on the answer only: shardtune.data's pipeline builds them once and the peer trains on those
token ids, so the comparison is of the training loops), the same LoRA shape, optimizer (AdamW 0.9/0.999, eps 1e-8, no
weight decay, clip 1.0), warmup + cosine schedule, steps, batch and seed. All three models are scored by the same
`shardtune evaluate` code (exact match, execution accuracy) and the same held-out loss function below.

  python bench/spider_peer.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
      --data ../shared/data/text2sql/spider_dev_alpaca.json --tables ../shared/data/text2sql/spider_tables.json \
      --out runs/spider_bench --steps 150 --seed 0 [--device cuda|cpu] [--db-dir spider/database]

Writes OUT/split, OUT/shardtune (a shardtune run), OUT/peer (a PEFT adapter), OUT/eval_*.json and the summary
bench/results/spider_<device>_seed<seed>.json (or --results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXAMPLE = REPO / "examples" / "spider_smollm2.yaml"


def shardtune_config(args, out: Path):
    from shardtune.config import load_config
    split = out / "split"
    return load_config(str(EXAMPLE), [
        f"model.name_or_path={args.gguf}", f"data.path={split / 'train.json'}",
        f"data.val_path={split / 'heldout.json'}", f"output.dir={out / 'shardtune'}", "output.overwrite=true",
        f"train.max_steps={args.steps}", f"train.seed={args.seed}", f"train.device={args.device}",
        f"train.micro_batch_size={args.batch}", "train.log_every=1", f"train.eval_every={args.eval_every}",
        "output.plot=false"])


def train_shardtune(args, out: Path) -> dict:
    from shardtune.train.loop import train
    cfg = shardtune_config(args, out)
    t0 = time.perf_counter()
    train(cfg, out=lambda *a: print(*a, flush=True))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "shardtune" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
    times = [r["time"] for r in rows if "loss" in r]
    steps_s = [b - a for a, b in zip(times, times[1:])]
    return {"wall_s": wall, "loss_curve": [losses[s] for s in sorted(losses)],
            "step_s_median": sorted(steps_s)[len(steps_s) // 2] if steps_s else None}


def train_peer(args, out: Path) -> dict:
    """transformers Trainer + peft on the samples shardtune's pipeline tokenized (same ids, same -100 masking)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from shardtune.data.pipeline import build_datasets
    from shardtune.model.load import load_tokenizer, resolve_model_dir

    cfg = shardtune_config(args, out)
    model_dir = resolve_model_dir(cfg.model)
    tok = load_tokenizer(model_dir)
    splits = build_datasets(cfg.data, tok, cfg.train.seed)
    keep = ("input_ids", "labels")
    train_ds = [{k: s[k] for k in keep} for s in splits.train]
    val_ds = [{k: s[k] for k in keep} for s in splits.val]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    targs = TrainingArguments(
        output_dir=str(out / "peer_trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=cfg.train.lr, lr_scheduler_type="cosine",
        warmup_steps=cfg.train.warmup_steps, weight_decay=0.0, max_grad_norm=cfg.train.grad_clip,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=args.device == "cpu",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    # HF's own cosine warmup starts at lr 0 on step 0, shardtune's at lr/warmup: hand the peer the same multiplier
    # (and the same AdamW) so the schedules are identical step for step, not one step apart.
    from shardtune.train.optim import lr_lambda
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.train.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train, args.steps))
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, optimizers=(opt, sched),
                      data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    model.save_pretrained(str(out / "peer"))
    tok.save_pretrained(str(out / "peer"))
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"wall_s": wall, "loss_curve": curve, "step_s_mean": wall / max(1, args.steps),
            "val_samples": len(val_ds)}


def heldout_loss(model, samples, device: str, batch: int = 16) -> float:
    """Token-weighted mean cross-entropy over the answer tokens of every held-out sample (one number for all three)."""
    import torch
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            n = max(len(s["input_ids"]) for s in chunk)
            ids = torch.zeros(len(chunk), n, dtype=torch.long)
            lab = torch.full((len(chunk), n), -100, dtype=torch.long)
            att = torch.zeros(len(chunk), n, dtype=torch.long)
            for j, s in enumerate(chunk):
                L = len(s["input_ids"])
                ids[j, :L], lab[j, :L], att[j, :L] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            tgt = lab[:, 1:].to(device)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            total += float(ce)
            count += int((tgt != -100).sum())
    return total / max(1, count)


def evaluate_all(args, out: Path, save=lambda: None, results: dict | None = None) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shardtune.data.pipeline import build_datasets
    from shardtune.eval.evaluate import evaluate
    from shardtune.export.adapter import load_for_inference, load_run, load_tokenizer

    run = out / "shardtune"
    info = load_run(run)
    tok = load_tokenizer(info)
    cfg = shardtune_config(args, out)
    val = build_datasets(cfg.data, tok, cfg.train.seed).val
    heldout = out / "split" / "heldout.json"
    kw = dict(tables=args.tables, db_dir=args.db_dir, max_new_tokens=128, batch_size=args.eval_batch,
              device=args.device, limit=args.limit)

    def base_model():
        return AutoModelForCausalLM.from_pretrained(info.base_model, dtype=torch.float32).to(args.device)

    results = {} if results is None else results
    for name in getattr(args, "models", "base,shardtune,peer").split(","):
        if name == "base":
            model = base_model()
        elif name == "shardtune":
            model, _ = load_for_inference(run, device=args.device, dtype=torch.float32)
        else:
            model = PeftModel.from_pretrained(base_model(), str(out / "peer"))
        model.eval()
        t0 = time.perf_counter()
        res = evaluate(run, heldout, model=model, tokenizer=tok, out=out / f"eval_{name}.json", **kw)
        s = res["summary"]
        results[name] = {"exact_match": s["exact_match"], "execution_accuracy": s["execution_accuracy"],
                         "execution_scored": s["execution_scored"], "records": s.get("records", len(res["records"])),
                         "heldout_loss": heldout_loss(model, val, args.device), "eval_s": time.perf_counter() - t0}
        print(name, json.dumps(results[name]), flush=True)
        save()  # a run cut short by a time limit keeps what it measured
        del model
    if (out / "eval_base.json").is_file():
        results["examples"] = compare_examples(out)
    return results


def compare_examples(out: Path, n: int = 6) -> dict:
    """Records the tuned models got right that the base got wrong (execution), and the other way round."""
    rows = {k: json.loads((out / f"eval_{k}.json").read_text())["records"] for k in ("base", "shardtune", "peer")}

    def ok(r):
        return bool(r.get("exec")) if r.get("exec") is not None else bool(r.get("exact"))

    keys = ("question", "prompt", "gold", "pred")
    def brief(r, pred_base):
        d = {k: r[k] for k in keys if k in r}
        d["base_pred"] = pred_base
        return d

    improved, regressed, still_wrong = [], [], []
    for b, s in zip(rows["base"], rows["shardtune"]):
        if ok(s) and not ok(b):
            improved.append(brief(s, b.get("pred")))
        elif ok(b) and not ok(s):
            regressed.append(brief(s, b.get("pred")))
        elif not ok(s):
            still_wrong.append(brief(s, b.get("pred")))
    return {"improved_count": len(improved), "regressed_count": len(regressed), "still_wrong_count": len(still_wrong),
            "improved": improved[:n], "regressed": regressed[:n], "still_wrong": still_wrong[:n]}


def plot_curves(result_files: list[str], png: str) -> None:
    """Training loss per step of shardtune and the peer, one line each per results file (seed), on one axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for f in result_files:
        r = json.loads(Path(f).read_text())
        for key, style in (("shardtune_train", "-"), ("peer_train", "--")):
            curve = (r.get(key) or {}).get("loss_curve") or []
            label = f"{key.split('_')[0]} seed {r.get('seed')}"
            line, = ax.plot(range(1, len(curve) + 1), curve, style, linewidth=0.6, alpha=0.35)
            # single steps differ by which 8 samples each trainer drew; the 10-step mean is what should agree
            avg = [sum(curve[max(0, i - 9):i + 1]) / len(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
            ax.plot(range(1, len(avg) + 1), avg, style, color=line.get_color(), linewidth=1.6,
                    label=f"{label} (10-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("SmolLM2-135M LoRA on Spider (16 training databases)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def precision_check(gguf_path: str, heldout_json: str, n: int = 8) -> dict:
    """The cached bf16 copy against the fp32 dequantization of the same GGUF (both computed in fp32) on `n` held-out
    prompts: what storing the dequantized base in bf16 costs, next to the file's own block quantization."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.model.gguf import dequantized_model_dir
    path = Path(gguf_path)
    cached = dequantized_model_dir(path)
    kw = {}
    try:
        from transformers import GgufConfig
        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    exact = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **kw)
    stored = AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(cached))
    num = den = 0.0
    for a, b in zip(exact.parameters(), stored.parameters()):
        num += float((a - b).pow(2).sum())
        den += float(a.pow(2).sum())
    worst = kl = 0.0
    agree = total = 0
    recs = json.loads(Path(heldout_json).read_text())[:n]
    with torch.no_grad():
        for r in recs:
            msgs = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                    {"role": "assistant", "content": r["output"]}]
            ids = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt")["input_ids"]
            la, lb = exact(ids).logits[0], stored(ids).logits[0]
            worst = max(worst, float((la - lb).abs().max()))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            total += la.shape[0]
            kl += float(torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True,
                                                   reduction="batchmean"))
    return {"weight_rel_rms_diff": (num / den) ** 0.5, "max_logit_abs_diff": worst, "top1_agreement": agree / total,
            "mean_kl_nats_per_token": kl / len(recs), "tokens": total}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "precision":  # bench/spider_peer.py precision FILE.gguf HELDOUT.json
        print(json.dumps(precision_check(sys.argv[2], sys.argv[3])))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "plot":  # bench/spider_peer.py plot OUT.png RESULTS.json ...
        plot_curves(sys.argv[3:], sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--data", required=True, help="Spider dev in DB-GPT-Hub's alpaca form (spider_dev_alpaca.json)")
    p.add_argument("--tables", required=True, help="Spider tables.json (schemas for the synthesized databases)")
    p.add_argument("--db-dir", default=None, help="real Spider databases <db_id>/<db_id>.sqlite")
    p.add_argument("--out", default="runs/spider_bench")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out records")
    p.add_argument("--seed", type=int, default=0, help="training seed (the split's seed is fixed at 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for both trainers (0: shardtune's rule, shardtune/threads.py: free cores)")
    p.add_argument("--only", default="split,shardtune,peer,eval")
    p.add_argument("--models", default="base,shardtune,peer",
                   help="models to score (the base model does not depend on the training seed)")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    else:  # the rule `shardtune train` applies, applied to the peer too so both run on the same thread count
        from shardtune.threads import configure_threads
        configure_threads(on_gpu=args.device != "cpu")
    out = Path(args.out)
    steps = set(args.only.split(","))
    res_path = Path(args.results or REPO / "bench" / "results" / f"spider_{args.device}_seed{args.seed}.json")
    result = json.loads(res_path.read_text()) if res_path.is_file() else {}
    result.update({"gguf": Path(args.gguf).name, "steps": args.steps, "micro_batch": args.batch, "seed": args.seed,
                   "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__})
    def save():
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if "split" in steps:
        from shardtune.data.split import split_by_database
        result["split"] = split_by_database(args.data, out / "split", 0.2, seed=0)
        result["split"].pop("records_per_database", None)
    if "shardtune" in steps:
        result["shardtune_train"] = train_shardtune(args, out)
        save()
    if "peer" in steps:
        result["peer_train"] = train_peer(args, out)
        save()
    if "eval" in steps:
        result["eval"] = {}
        evaluate_all(args, out, save, result["eval"])
    import transformers
    result["transformers"] = transformers.__version__
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                                   else str(o)) + "\n")
    print(f"wrote {res_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
