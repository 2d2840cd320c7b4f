"""Useful tokens/s on real short samples: shardtune with packing against the peer's padded batches (issue 17).

    python bench/realdata_bench.py --out $OUT/realdata_h200.json \
        --variants st:mb=1,ckpt=1 peer:ckpt=1 st:mb=2,ckpt=1 peer:ckpt=1

Both sides train the same token samples: Spider records (alpaca format, default .devdata/spider_dev_alpaca.json,
which `python bench/plan_auto_bench.py prep` copies from the shared data folder) rendered, tokenized and
prompt-masked (-100 labels) by shardtune's own data pipeline, with a BPE tokenizer trained on the records (real-text
lengths) on a random-weight checkpoint of --shape (bench/common.py). shardtune packs the samples into rows of up to
--seq tokens (data.packing=true) and takes `mb` rows per step; the peer (HF Trainer + peft + bitsandbytes, set up as
bench/speed_bench.py's) gets the same samples unpacked, padded to the longest of each batch
(DataCollatorForSeq2Seq). A peer's `mb=auto` (its default) is the mean samples per step measured for the nearest
shardtune variant listed before it, rounded, so both train on the same number of samples per step.

Counts come from the batches each trainer actually collated during the measured steps (warm-up excluded): samples,
real tokens with a label (response), real tokens without one (prompt), and padding positions. Throughputs are totals
over the measured steps divided by their summed time (packed rows and padded batches vary in size step to step).
Variant keys: ckpt (gradient checkpointing 0/1), mb (shardtune: packed rows per step; peer: samples per step or
auto), liger (0/1), method (qlora/lora), fused (shardtune fused loss 0/1), group (peer: group_by_length sampler
0/1), cap (GB: cap this process's GPU memory). On a machine without CUDA (a tiny shape, for testing) the peaks are
the process's resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import SHAPES, peer_model, peer_training_args, step_timer, write_random_checkpoint  # noqa: E402
from bench.plan_auto_bench import DEVDATA, SHARED_SPIDER, _spider_tokenizer, prep  # noqa: E402
from bench.speed_bench import _cap, _cuda, _peak  # noqa: E402

IGNORE = -100
KEYS = {"ckpt", "mb", "liger", "method", "fused", "group", "cap"}


def parse_variant(text: str) -> dict:
    kind, _, rest = text.partition(":")
    if kind not in ("st", "peer"):
        raise SystemExit(f"variant {text!r}: starts with 'st:' or 'peer:' (e.g. st:mb=1,ckpt=1 peer:ckpt=1)")
    v = {"kind": kind, "ckpt": 1, "mb": 1 if kind == "st" else "auto", "liger": 0, "method": "qlora", "fused": 1,
         "group": 0, "cap": 0.0, "label": text}
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition("=")
        if k not in KEYS or not val:
            raise SystemExit(f"variant {text!r}: unknown or empty key {k!r}; keys: {', '.join(sorted(KEYS))}")
        v[k] = val if k == "method" or (k == "mb" and val == "auto") else float(val) if k == "cap" else int(val)
    if v["mb"] == "auto" and kind == "st":
        raise SystemExit(f"variant {text!r}: mb=auto is for peer variants; give shardtune its packed rows (mb=1)")
    return v


def data_overrides(model_dir: str, data: str, seq: int, packing: bool) -> list[str]:
    """The data settings both sides build their samples with (the peer's differ only in packing=false)."""
    ov = [f"model.name_or_path={model_dir}", f"data.path={data}", "data.format=alpaca",
          f"data.packing={str(packing).lower()}", f"data.max_seq_len={seq}", "data.val_fraction=0"]
    return ov + ([] if _cuda() else ["train.precision=fp32"])


# ------------------------------------------------------------------------------------------------ counting

def batch_counts(features: list[dict], batch: dict) -> dict:
    """What one collated batch holds. `features` are what went into the collator (packed rows or samples), `batch`
    what came out. Real positions are the first len(feature) of each row (the attention mask where there is one,
    checked against the lengths); labelled = label != -100; padding = everything else past each row's end."""
    import torch
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    lengths = torch.tensor([len(f["input_ids"]) for f in features])
    real = torch.arange(width)[None, :] < lengths[:, None]
    if "attention_mask" in batch and not torch.equal(batch["attention_mask"].bool(), real):
        raise RuntimeError("collated attention_mask disagrees with the samples' lengths (left padding?)")
    lab = labels != IGNORE
    samples = sum(sum(1 for p in f["position_ids"] if p == 0) if "position_ids" in f else 1 for f in features)
    return {"rows": rows, "width": width, "samples": samples, "labelled": int(lab.sum()),
            "unlabelled": int((real & ~lab).sum()), "padding": int((~real).sum()),
            "labelled_padding": int((lab & ~real).sum())}


class Recorder:
    """Wraps a collator and keeps each (features, batch) it produced; counted after the run, off the clock."""

    def __init__(self, collate):
        self.collate, self.calls = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        # references only (no work on the clock); a collator may rewrite its features' labels, not these lists
        self.calls.append(([{k: f[k] for k in ("input_ids", "position_ids") if k in f} for f in features], batch))
        return batch

    def counts(self, first: int, n: int) -> list[dict]:
        if len(self.calls) < first + n:
            raise RuntimeError(f"{len(self.calls)} batches collated, expected at least {first + n}")
        return [batch_counts(f, b) for f, b in self.calls[first:first + n]]


# ------------------------------------------------------------------------------------------------ shardtune

def run_shardtune(v: dict, a) -> dict:
    import torch
    from shardtune.config import load_config
    from shardtune.train.loop import Trainer
    _cap(v["cap"])
    n = a.steps + a.warmup
    cfg = load_config(None, data_overrides(a.model_dir, a.data, a.seq, True) + [
        f"train.method={v['method']}", f"train.micro_batch_size={v['mb']}", "train.grad_accum=1",
        f"train.max_steps={n}", f"train.gradient_checkpointing={bool(v['ckpt'])}",
        f"train.kernels={('liger' if _cuda() else 'auto') if v['liger'] else 'none'}",
        f"train.fused_loss={bool(v['fused'])}", "train.eval_every=0", "train.log_every=1000", "train.save_every=0",
        f"output.dir={a.result}.out", "output.overwrite=true", "output.report_to=none", "output.plot=false",
        "lora.rank=16", "lora.alpha=32", "lora.dropout=0.05", "train.lr=2e-4", "train.warmup_steps=0"])
    tr = Trainer(cfg, out=lambda m: print(m, flush=True), time_steps=True)
    tr.setup()
    # the loop collates one micro batch per step here (grad_accum 1, one rank): record the Trainer's own batches
    rec = Recorder(tr.collate)
    tr.collate = rec
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    tr.run()
    alloc, reserved = _peak()
    if len(rec.calls) != n:
        raise RuntimeError(f"shardtune collated {len(rec.calls)} batches in {n} steps; expected one per step")
    return {"times": tr.step_times[a.warmup:], "counts": rec.counts(a.warmup, a.steps), "peak_alloc": alloc,
            "peak_reserved": reserved, "kernels": tr.kernels, "fused": tr.fused, "data": tr.data_stats}


# ------------------------------------------------------------------------------------------------ the peer

def unpacked_samples(a) -> tuple[list[dict], object]:
    """(samples, tokenizer): the samples shardtune packs, before packing (same file, template, tokenizer, masking
    and order)."""
    from shardtune.config import load_config
    from shardtune.data.pipeline import build_datasets
    from shardtune.model.load import load_tokenizer
    cfg = load_config(None, data_overrides(a.model_dir, a.data, a.seq, False))
    tok = load_tokenizer(Path(a.model_dir))
    return build_datasets(cfg.data, tok, cfg.train.seed).train, tok


def _sampler_args(group: bool) -> dict:
    from transformers import TrainingArguments
    if not group:
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:  # transformers >= 5.x
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def run_peer(v: dict, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer
    _cap(v["cap"])
    samples, tok = unpacked_samples(a)
    model = peer_model(a.model_dir, v["method"], bool(v["ckpt"]))
    n = a.steps + a.warmup
    times: list[float] = []
    rec = Recorder(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE, return_tensors="pt"))
    args = peer_training_args(f"{a.result}.out", v["mb"], n, bool(v["ckpt"]), bool(v["liger"]), seed=0,
                              **_sampler_args(bool(v["group"])))
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(samples), data_collator=rec,
            callbacks=[step_timer(times)]).train()
    alloc, reserved = _peak()
    # batch k of the data loader is step k's (accelerate may collate one batch ahead at the end: ignored)
    return {"times": times[a.warmup:], "counts": rec.counts(a.warmup, a.steps), "peak_alloc": alloc,
            "peak_reserved": reserved, "data": {"train_samples": len(samples)}}


# ------------------------------------------------------------------------------------------------ driver

def worker(a) -> None:
    v = json.loads(a.worker)
    try:
        r = (run_peer if v["kind"] == "peer" else run_shardtune)(v, a)
        r["ok"] = True
    except Exception as e:  # an OOM or failure is a result too
        import traceback
        traceback.print_exc()
        r = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    Path(a.result).write_text(json.dumps(r))


def summarise(v: dict, r: dict) -> dict:
    row = {"variant": v["label"], "kind": v["kind"], "method": v["method"], "ckpt": v["ckpt"], "micro_batch": v["mb"],
           "liger": v["liger"], "group_by_length": v["group"], "cap_gb": v["cap"], "ok": r.get("ok", False)}
    if "mb_from" in v:
        row["micro_batch_from"] = v["mb_from"]
    if not row["ok"]:
        row["error"] = r.get("error")
        return row
    c, times = r["counts"], r["times"]
    total_s = sum(times)
    tot = {k: sum(s[k] for s in c) for k in ("samples", "labelled", "unlabelled", "padding", "labelled_padding")}
    positions = sum(s["rows"] * s["width"] for s in c)
    useful = tot["labelled"] + tot["unlabelled"]
    row.update(
        steps_measured=len(times), median_step_s=round(statistics.median(times), 4),
        samples_per_step=round(tot["samples"] / len(c), 3), samples_per_s=round(tot["samples"] / total_s, 3),
        labelled_tokens_per_s=round(tot["labelled"] / total_s, 1),
        unlabelled_tokens_per_s=round(tot["unlabelled"] / total_s, 1),
        useful_tokens_per_s=round(useful / total_s, 1), positions_per_s=round(positions / total_s, 1),
        padding_fraction=round(tot["padding"] / positions, 4), labelled_padding=tot["labelled_padding"],
        peak_alloc_gb=round(r["peak_alloc"], 3), peak_reserved_gb=round(r["peak_reserved"], 3),
        step_times=[round(t, 4) for t in times], step_counts=c, data=r.get("data"))
    for k in ("kernels", "fused"):
        if k in r:
            row[k] = r[k]
    return row


def compare(rows: list[dict]) -> None:
    """Each row against the first peer that ran (the reference) and the fastest peer, in useful and labelled tok/s."""
    peers = [r for r in rows if r["kind"] == "peer" and r["ok"]]
    if not peers:
        return
    ref, best = peers[0], max(peers, key=lambda r: r["useful_tokens_per_s"])
    for r in rows:
        if r["ok"]:
            r["x_peer_useful"] = round(r["useful_tokens_per_s"] / ref["useful_tokens_per_s"], 3)
            r["x_peer_labelled"] = round(r["labelled_tokens_per_s"] / ref["labelled_tokens_per_s"], 3)
            r["x_best_peer_useful"] = round(r["useful_tokens_per_s"] / best["useful_tokens_per_s"], 3)
            r["peer_reference"] = ref["variant"]


def ensure_data(path: Path) -> Path:
    if path.exists():
        return path
    if path == DEVDATA and SHARED_SPIDER.exists():
        return prep()
    raise SystemExit(f"--data {path}: not found; run `python bench/plan_auto_bench.py prep` (copies Spider into "
                     ".devdata/) or pass an alpaca-format .json")


def ensure_model(shape: str, model_dir: Path, data: Path) -> Path:
    import torch
    write_random_checkpoint(shape, model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    mark = model_dir / "spider_tokenizer.txt"
    if mark.exists() and str(data) not in mark.read_text():
        mark.unlink()  # trained on another file: retrain on this one
    _spider_tokenizer(model_dir, data)
    return model_dir


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048, help="shardtune's data.max_seq_len (packed row length)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", default=str(DEVDATA), help="alpaca-format records (default: Spider dev in .devdata/)")
    ap.add_argument("--model-dir", default=None, help="default /tmp/realdata-<shape>")
    ap.add_argument("--variants", nargs="+", default=["st:mb=1,ckpt=1", "peer:ckpt=1"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    a.model_dir = a.model_dir or f"/tmp/realdata-{a.shape}"
    if a.worker:
        return worker(a)
    variants = [parse_variant(t) for t in a.variants]

    import torch
    t0 = time.time()
    data = ensure_data(Path(a.data).resolve())
    ensure_model(a.shape, Path(a.model_dir), data)
    print(f"checkpoint and tokenizer ready in {time.time() - t0:.0f} s: {a.model_dir}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="realdata-"))  # results and run outputs of this call's workers
    rows: list[dict] = []
    last_st = None
    for i, v in enumerate(variants):
        t1 = time.time()
        if v["mb"] == "auto":
            if last_st is None:
                rows.append(summarise(v, {"ok": False, "error": "mb=auto needs a shardtune variant that ran before "
                                                                "it; list st:... first or give mb=N"}))
                continue
            v["mb"], v["mb_from"] = max(1, round(last_st["samples_per_step"])), last_st["variant"]
        res_file = work / f"result-{i}.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(v), "--result", str(res_file), "--shape", a.shape,
               "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--data", str(data),
               "--model-dir", a.model_dir]
        subprocess.run(cmd, check=False)
        r = json.loads(res_file.read_text()) if res_file.exists() else {"ok": False, "error": "worker died"}
        row = summarise(v, r)
        row["wall_s"] = round(time.time() - t1, 1)
        rows.append(row)
        if row["ok"] and row["kind"] == "st":
            last_st = row
        print("RESULT " + json.dumps({k: row[k] for k in row if k not in ("step_times", "step_counts", "data")}),
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    compare(rows)
    out = {"bench": "realdata", "shape": a.shape, "seq": a.seq, "steps": a.steps, "warmup": a.warmup,
           "data": str(data), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "command": " ".join(["bench/realdata_bench.py"] + (argv or sys.argv[1:])),
           "rows": rows}
    print(f"{'variant':28s} {'smp/step':>8s} {'smp/s':>7s} {'lab tok/s':>10s} {'unl tok/s':>10s} {'pad':>6s} "
          f"{'step s':>7s} {'resv GB':>7s} {'x peer':>6s}")
    for r in rows:
        if r["ok"]:
            print(f"{r['variant']:28s} {r['samples_per_step']:8.2f} {r['samples_per_s']:7.2f} "
                  f"{r['labelled_tokens_per_s']:10.0f} {r['unlabelled_tokens_per_s']:10.0f} "
                  f"{r['padding_fraction']:6.3f} {r['median_step_s']:7.3f} {r['peak_reserved_gb']:7.2f} "
                  f"{r.get('x_peer_useful', 0):6.2f}")
        else:
            print(f"{r['variant']:28s} FAILED {r.get('error')}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
