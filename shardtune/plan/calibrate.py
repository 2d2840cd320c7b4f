"""Compare the planner with measured runs, and fit its constants to them.

Records come from the GPU benchmarks (bench/results/*.json written by bench/speed_bench.py: a `rows` list, one
per variant) or from a plain list of records (see `Record`). `evaluate` gives the error of every prediction and
the worst; `fit` tunes named fields of PlanConstants (Nelder-Mead on squared log errors, pure Python).

    python -m shardtune.plan.calibrate bench/results/cal_*.json bench/results/speed_*.json
    python -m shardtune.plan.calibrate bench/results/*.json --fit matmul_eff,host_lora_s --target speed
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from shardtune.errors import ConfigError
from shardtune.hardware import Hardware, find_gpu, parse_gpus
from shardtune.model.shapes import ModelShape, resolve_shape
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.memory import predict_memory
from shardtune.plan.setup import TrainSetup
from shardtune.plan.speed import predict_speed

# bench/common.py SHAPES -> catalogue entries with the same dimensions (tie_word_embeddings included)
BENCH_SHAPES = {"llama3-1b": "Llama-3.2-1B", "llama3-3b": "Llama-3.2-3B", "llama3-8b": "Llama-3-8B",
                "llama2-13b": "Llama-2-13B", "llama2-70b": "Llama-2-70B"}


@dataclass
class Record:
    """One measured run: what ran (model, hardware, setup) and what it used (per-GPU peaks in bytes, tokens/s for
    all GPUs together). Missing measurements are None and are skipped."""

    label: str
    model: str
    gpus: str
    setup: TrainSetup
    peak_allocated: float | None = None
    peak_reserved: float | None = None
    tokens_per_s: float | None = None
    source: str = ""
    cpu_rss: float | None = None          # per rank, bytes, after the timed steps (steady state)
    load_peak_rss: float | None = None    # per rank, bytes, the loader's peak RSS

    def hardware(self) -> Hardware:
        return parse_gpus(self.gpus)

    def shape(self) -> ModelShape:
        return resolve_shape(self.model)


def record_from_dict(d: dict, source: str = "") -> Record:
    """A plain record: {"label", "model", "gpus", <TrainSetup fields>, "peak_allocated_gb" | "peak_allocated",
    "peak_reserved_gb" | "peak_reserved", "tokens_per_s"}. GB here are 1e9 bytes (torch's numbers / 1e9)."""
    def measured(key):
        if d.get(key + "_gb") is not None:
            v = d[key + "_gb"]
            return max(v) * 1e9 if isinstance(v, list) else v * 1e9
        v = d.get(key)
        return (max(v) if isinstance(v, list) else v) if v is not None else None
    try:
        setup = TrainSetup.from_dict(d)
    except TypeError as e:
        raise ConfigError(f"{source}: record {d.get('label', '?')} is not a training setup ({e})") from None
    return Record(label=str(d.get("label", "")), model=str(d["model"]), gpus=str(d["gpus"]), setup=setup,
                  peak_allocated=measured("peak_allocated"), peak_reserved=measured("peak_reserved"),
                  tokens_per_s=d.get("tokens_per_s"), source=source)


def records_from_bench(d: dict, source: str = "") -> list[Record]:
    """shardtune rows (kind 'st') of a bench/speed_bench.py result. The bench trains with LoRA r=16, dropout 0.05
    on all linear layers, bf16, AdamW; `fused` on CUDA means Liger's fused linear cross-entropy (installed there)."""
    model = BENCH_SHAPES.get(d.get("shape", ""))
    if model is None:
        return []
    gpu = find_gpu(d.get("gpu", "")) if d.get("gpu") else None
    out = []
    for r in d.get("rows", []):
        if r.get("kind") != "st" or not r.get("ok"):
            continue
        world = int(r.get("world_size") or r.get("nproc") or 1)
        gpus = f"{world}x{gpu.name if gpu else 'H100'}"
        if r.get("cap_gb"):
            gpus += f"@{r['cap_gb'] * 1e9 / 2 ** 30:.3f}GB"
        strategy = r.get("strategy") or ("none" if world == 1 else "fsdp")
        setup = TrainSetup(
            method=r.get("method", "qlora"), strategy=strategy, zero_stage=int(r.get("zero_stage", 3)),
            offload_optimizer=bool(r.get("offload_optimizer", False)), offload_param=bool(r.get("offload_param", False)),
            world_size=world, gpus_per_node=world, micro_batch=int(r["micro_batch"]), seq_len=int(d["seq"]),
            grad_accum=int(r.get("grad_accum", 1)), grad_ckpt=bool(r.get("ckpt")), precision=r.get("precision", "bf16"),
            lora_rank=int(r.get("lora_rank", 16)), lora_dropout=float(r.get("lora_dropout", 0.05)),
            kernels="liger" if r.get("kernels") == "liger" else "none",
            fused_loss="liger" if (r.get("fused") and strategy == "none") else "none")
        def gb(key):
            v = r.get(key)
            return None if v is None else (max(v) if isinstance(v, list) else v) * 1e9
        out.append(Record(label=f"{d['shape']} s{d['seq']} {r['variant']}", model=model, gpus=gpus, setup=setup,
                          peak_allocated=gb("peak_alloc_gb"), peak_reserved=gb("peak_reserved_gb"),
                          tokens_per_s=r.get("tokens_per_s"), source=source))
    return out


def _dist_loss_path(d: dict, liger: bool, strategy: str) -> str:
    """The loss path a dist_bench run took: recorded as `loss_path` ('fused' | 'logits') since the fused loss runs
    under every engine; older files without it ran the fused loss on the one-process engine only."""
    path = d.get("loss_path")
    fused = path == "fused" if path is not None else strategy == "none"
    return ("liger" if liger else "chunked") if fused else "none"


def _layers_per_unit(d: dict) -> int:
    """FSDP decoder layers per unit of a dist_bench run: the result's own field, or the `--layers-per-unit` argument
    of the units_* sweep; runs from before the option had one per unit."""
    return int(d.get("fsdp_layers_per_unit") or d.get("args", {}).get("layers_per_unit") or 1)


def records_from_dist_bench(d: dict, source: str = "") -> list[Record]:
    """One record from a bench/dist_bench.py result ({"args": {...}, "world", "ranks": [...], "tokens_per_s"}).

    Per-GPU peaks are the maximum over ranks. `--offload` sets both offload_optimizer and offload_param; `--cap` GB
    (1e9 bytes) becomes the per-process cap of the hardware string. dist_bench uses kernels=auto (Liger on CUDA);
    only the single-process run (strategy none) takes Liger's fused linear cross-entropy; fsdp/deepspeed compute
    the loss over full logits."""
    a = d.get("args", {})
    model = BENCH_SHAPES.get(a.get("shape", ""))
    if model is None or d.get("adapter_replicated"):
        return []  # a replicated (unsharded) adapter under FSDP is an experiment's setup the planner cannot express
    world = int(d.get("world", 1))
    gpu = find_gpu(d.get("gpu", "")) if d.get("gpu") else None
    gpus = f"{world}x{gpu.name if gpu else 'H100'}"
    if a.get("cap"):
        gpus += f"@{float(a['cap']) * 1e9 / 2 ** 30:.3f}GB"
    strategy = d.get("strategy") or a.get("strategy", "none")
    liger = bool(a.get("liger", 1))
    offload = bool(a.get("offload", False))
    setup = TrainSetup(
        method=a.get("method", "qlora"), strategy=strategy, zero_stage=int(a.get("zero_stage", 3)),
        offload_optimizer=offload, offload_param=offload, world_size=world, gpus_per_node=world,
        micro_batch=int(a.get("mb", 1)), seq_len=int(a.get("seq", 2048)), grad_accum=int(a.get("accum", 1)),
        grad_ckpt=bool(a.get("ckpt", 1)), precision=a.get("precision", "bf16"), lora_rank=16, lora_dropout=0.05,
        kernels="liger" if liger else "none",
        fused_loss=_dist_loss_path(d, liger, strategy),
        fsdp_layers_per_unit=_layers_per_unit(d),
        zero3_leaf=strategy == "deepspeed" and "parallel.zero3_leaf_layers=true" in (a.get("set") or []),
        zero3_cpu_load=strategy == "deepspeed" and "parallel.zero3_load=cpu" in (a.get("set") or []))
    ranks = d.get("ranks") or []

    def peak(key):
        vals = [r[key] for r in ranks if r.get(key) is not None]
        return max(vals) * 1e9 if vals else None
    label = (f"{a['shape']} s{a.get('seq')} mb{a.get('mb')} {world}x {strategy}"
             f"{' z' + str(a.get('zero_stage')) if strategy in ('fsdp', 'deepspeed') else ''} ckpt{int(bool(a.get('ckpt', 1)))}"
             f"{' offload' if offload else ''}{' cap' + str(a['cap']) if a.get('cap') else ''}"
             f"{' u' + str(_layers_per_unit(d)) if _layers_per_unit(d) > 1 else ''}"
             f"{' fused' if strategy != 'none' and d.get('loss_path') == 'fused' else ''}"
             f"{' leaf' if 'parallel.zero3_leaf_layers=true' in (a.get('set') or []) else ''}"
             f"{' cpu-load' if 'parallel.zero3_load=cpu' in (a.get('set') or []) else ''}")
    loads = [(r.get("load_report") or {}).get("peak_rss_bytes") for r in ranks]
    loads = [v for v in loads if v]
    return [Record(label=label, model=model, gpus=gpus, setup=setup, peak_allocated=peak("peak_alloc_gb"),
                   peak_reserved=peak("peak_reserved_gb"), tokens_per_s=d.get("tokens_per_s"), source=source,
                   cpu_rss=peak("cpu_rss_gb"), load_peak_rss=max(loads) if loads else None)]


def load_records(paths: Iterable[str | Path]) -> list[Record]:
    out: list[Record] = []
    for p in paths:
        p = Path(p)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"calibration file {p} is unreadable ({e})") from None
        if isinstance(data, dict) and "ranks" in data and "args" in data:
            out += records_from_dist_bench(data, str(p))
        elif isinstance(data, dict) and "rows" in data:
            out += records_from_bench(data, str(p))
        elif isinstance(data, dict) and "records" in data:
            out += [record_from_dict(r, str(p)) for r in data["records"]]
        elif isinstance(data, list):
            out += [record_from_dict(r, str(p)) for r in data]
        else:
            raise ConfigError(f"calibration file {p}: expected bench rows, a records list or {{'records': [...]}}")
    return out


def default_paths(root: str | Path = ".") -> list[str]:
    root = Path(root)
    pats = ["bench/results/calibration*.json", "bench/results/cal_*.json", "bench/results/speed_*.json",
            "bench/results/d*_[0-9]gpu*.json", "bench/results/units_*.json", "bench/results/hostfix_*.json",
            "bench/results/i16_*.json"]
    seen: list[str] = []
    for pat in pats:
        for f in sorted(glob.glob(str(root / pat))):
            if f not in seen:
                seen.append(f)
    return seen


# ------------------------------------------------------------------------------------------------ fitting set

# The committed record files each fitted constant of PlanConstants was tuned on (from the git history of
# constants.py): every other record is held out for that target. The H100 rows fitted the allocator slack and five
# speed constants (746c712, on the files of 4bf0945); the first five sharded 2xH200 runs the sharded slack and the
# first two ZeRO-3 runs the ZeRO-3 hook cost (46f0be1); ZeRO-3's extra allocation the three ZeRO-3 runs (98c0c19).
_H100_ROWS = ("cal_1b_s4096.json", "cal_3b_s1024.json", "cal_8b_s512.json", "speed_h100_8b_a.json",
              "speed_h100_8b_b.json")
_SHARDED_FIRST = ("d8b_fsdp_2gpu.json", "d8b_fsdp_z2_ckpt0_2gpu.json", "d8b_ds3_2gpu.json", "d8b_ds3_ckpt0_2gpu.json",
                  "d70b_fsdp_offload_2gpu_cap24.json")
_DS3 = ("d8b_ds3_2gpu.json", "d8b_ds3_ckpt0_2gpu.json", "d8b_ds3_mb2_ckpt1_2gpu_final.json")
FITTED_ON: dict[str, tuple[str, tuple[str, ...]]] = {
    "alloc_frag_layer_frac": ("memory", _H100_ROWS), "alloc_frag_min_bytes": ("memory", _H100_ROWS),
    "shard_slack_bytes": ("memory", _SHARDED_FIRST), "shard_slack_loss_frac": ("memory", _SHARDED_FIRST),
    "ds_zero3_extra_bytes": ("memory", _DS3),
    "matmul_eff": ("speed", _H100_ROWS), "host_lora_s": ("speed", _H100_ROWS),
    "host_quant_linear_s": ("speed", _H100_ROWS), "host_backward_factor": ("speed", _H100_ROWS),
    "host_gpu_serial": ("speed", _H100_ROWS), "host_zero3_module_s": ("speed", _DS3[:2]),
    "host_zero3_leaf_param_s": ("speed", ("d8b_deepspeed_leaf_mb2_ckpt1_1rank.json",)),
    # --stack hf only (its rows are checked by tests/plan/test_plan_hf_peer.py, not in this tool's default files)
    "hf_loss_cache_bytes_per_logit": ("memory", ("hf_peer_memory_3b_h200.json",)),
}


def split_records(records: list[Record], target: str = "memory") -> tuple[list[Record], list[Record]]:
    """(fitting set, held-out set) for `target` ('memory' or 'speed'): a record is in the fitting set when its file
    was used to fit any constant of that target (FITTED_ON)."""
    files = {f for t, fs in FITTED_ON.values() if t == target for f in fs}
    fitting = [r for r in records if Path(r.source).name in files]
    return fitting, [r for r in records if Path(r.source).name not in files]


# ------------------------------------------------------------------------------------------------ evaluate

@dataclass
class Row:
    record: Record
    pred_allocated: float
    pred_reserved: float
    pred_tokens_per_s: float

    def err(self, what: str) -> float | None:
        meas = {"allocated": self.record.peak_allocated, "reserved": self.record.peak_reserved,
                "tokens_per_s": self.record.tokens_per_s}[what]
        pred = {"allocated": self.pred_allocated, "reserved": self.pred_reserved,
                "tokens_per_s": self.pred_tokens_per_s}[what]
        return None if not meas else pred / meas - 1


@dataclass
class CalibrationReport:
    rows: list[Row] = field(default_factory=list)

    def worst(self, what: str) -> tuple[Row | None, float]:
        best: tuple[Row | None, float] = (None, 0.0)
        for r in self.rows:
            e = r.err(what)
            if e is not None and abs(e) >= abs(best[1]):
                best = (r, e)
        return best

    def errors(self, what: str) -> list[float]:
        return [e for e in (r.err(what) for r in self.rows) if e is not None]

    def summary(self, what: str) -> str:
        """'n records, worst +x% (label), mean |error| y%' for one measurement."""
        errs = self.errors(what)
        if not errs:
            return f"0 records with a measured {what}"
        row, e = self.worst(what)
        return (f"{len(errs)} records, worst {100 * e:+.1f}% ({row.record.label}), "
                f"mean |error| {100 * sum(abs(x) for x in errs) / len(errs):.1f}%")

    def table(self) -> str:
        lines = [f"{'record':58s} {'alloc GB meas/pred':>20s} {'reserved GB meas/pred':>22s} {'tokens/s meas/pred':>22s}"]
        for r in self.rows:
            rec = r.record

            def cell(meas, pred, scale, fmt):
                if meas is None:
                    return f"{'-':>8s}/{fmt.format(pred / scale)}"
                return f"{fmt.format(meas / scale)}/{fmt.format(pred / scale)} ({100 * (pred / meas - 1):+5.1f}%)"
            lines.append(f"{rec.label[:58]:58s} {cell(rec.peak_allocated, r.pred_allocated, 1e9, '{:7.2f}'):>20s} "
                         f"{cell(rec.peak_reserved, r.pred_reserved, 1e9, '{:7.2f}'):>22s} "
                         f"{cell(rec.tokens_per_s, r.pred_tokens_per_s, 1, '{:7.0f}'):>22s}")
        for what in ("allocated", "reserved", "tokens_per_s"):
            row, e = self.worst(what)
            if row is not None:
                lines.append(f"worst {what}: {100 * e:+.1f}% ({row.record.label})")
        return "\n".join(lines)


def cpu_rows(records: list[Record], c: PlanConstants = DEFAULT_CONSTANTS) -> list[tuple[Record, str, float, float]]:
    """(record, 'steady' | 'load', measured, predicted) CPU RAM per rank for every record that measured it: the
    RSS after the timed steps against the node's predicted CPU RAM / ranks, the loader's peak RSS against the
    predicted load-time peak."""
    out = []
    for rec in records:
        if rec.cpu_rss is None and rec.load_peak_rss is None:
            continue
        m = predict_memory(rec.shape(), rec.setup, rec.hardware(), c)
        if rec.cpu_rss:
            out.append((rec, "steady", rec.cpu_rss, m.cpu_total / rec.setup.gpus_per_node))
        if rec.load_peak_rss:
            out.append((rec, "load", rec.load_peak_rss, float(m.load_peak_cpu_per_rank)))
    return out


def evaluate(records: list[Record], c: PlanConstants = DEFAULT_CONSTANTS) -> CalibrationReport:
    rep = CalibrationReport()
    for rec in records:
        shape, hw = rec.shape(), rec.hardware()
        m = predict_memory(shape, rec.setup, hw, c)
        s = predict_speed(shape, rec.setup, hw, c)
        rep.rows.append(Row(rec, m.peak_allocated, m.peak_reserved, s.tokens_per_s))
    return rep


# ------------------------------------------------------------------------------------------------ fit

def _nelder_mead(f: Callable[[list[float]], float], x0: list[float], iters: int = 400, step: float = 0.25) -> list[float]:
    n = len(x0)
    pts = [list(x0)] + [[x0[j] + (step if i == j else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centroid = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        refl = [centroid[j] + (centroid[j] - pts[-1][j]) for j in range(n)]
        fr = f(refl)
        if fr < vals[0]:
            exp = [centroid[j] + 2 * (centroid[j] - pts[-1][j]) for j in range(n)]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [centroid[j] + 0.5 * (pts[-1][j] - centroid[j]) for j in range(n)]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
    return pts[min(range(n + 1), key=lambda i: vals[i])]


def fit(records: list[Record], names: list[str], c: PlanConstants = DEFAULT_CONSTANTS,
        target: str = "speed", iters: int = 400) -> PlanConstants:
    """Constants with `names` tuned (in log space, so they stay positive) to minimise the squared log error of
    tokens/s (target='speed') or of peak reserved memory (target='memory') over `records`."""
    known = c.to_dict()
    for n in names:
        if n not in known or not isinstance(known[n], (int, float)) or isinstance(known[n], bool):
            raise ConfigError(f"cannot fit '{n}': not a numeric planner constant")
    what = "tokens_per_s" if target == "speed" else "reserved"
    usable = [r for r in records if (r.tokens_per_s if what == "tokens_per_s" else r.peak_reserved)]
    if not usable:
        raise ConfigError(f"no records with a measured {what} to fit")
    cache = [(r, r.shape(), r.hardware()) for r in usable]

    def consts(x):
        kw = {}
        for n, v in zip(names, x):
            val = math.exp(v)
            kw[n] = int(round(val)) if isinstance(known[n], int) else val
        return c.replace(**kw)

    def loss(x):
        cc = consts(x)
        tot = 0.0
        for r, shape, hw in cache:
            if what == "tokens_per_s":
                pred, meas = predict_speed(shape, r.setup, hw, cc).tokens_per_s, r.tokens_per_s
            else:
                pred, meas = predict_memory(shape, r.setup, hw, cc).peak_reserved, r.peak_reserved
            tot += math.log(pred / meas) ** 2
        return tot / len(cache)

    x0 = [math.log(max(known[n], 1e-12)) for n in names]
    return consts(_nelder_mead(loss, x0, iters=iters))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardtune.plan.calibrate",
                                 description="planner predictions vs measured runs; optionally fit constants")
    ap.add_argument("files", nargs="*", help="bench results / record files (default: bench/results/cal*, speed_*)")
    ap.add_argument("--constants", help="a JSON of PlanConstants fields to start from")
    ap.add_argument("--fit", help="comma-separated constant names to fit")
    ap.add_argument("--target", choices=["speed", "memory"], default="speed")
    ap.add_argument("--out", help="write the (fitted) constants here as JSON")
    args = ap.parse_args(argv)
    c = PlanConstants.load(args.constants) if args.constants else DEFAULT_CONSTANTS
    records = load_records(args.files or default_paths())
    if not records:
        print("no records found", file=sys.stderr)
        return 2
    print(evaluate(records, c).table())
    if not args.files:
        for target, whats in (("memory", ("reserved", "allocated")), ("speed", ("tokens_per_s",))):
            for name, part in zip(("fitting set", "held out"), split_records(records, target)):
                rep = evaluate(part, c)
                for what in whats:
                    print(f"{name:11s} {what:12s}: {rep.summary(what)}")
    cpu = cpu_rows(records, c)
    if cpu:
        print("\nCPU RAM per rank (GB)                                        measured / predicted")
        for rec, what, meas, pred in cpu:
            err = 100 * (pred / meas - 1)
            print(f"{rec.label[:58]:58s} {what:6s} {meas / 1e9:7.2f} / {pred / 1e9:7.2f} ({err:+5.1f}%)")
    if args.fit:
        names = [n.strip() for n in args.fit.split(",") if n.strip()]
        c = fit(records, names, c, target=args.target)
        print("\nfitted: " + ", ".join(f"{n}={getattr(c, n):.4g}" for n in names) + "\n")
        print(evaluate(records, c).table())
    if args.out:
        Path(args.out).write_text(json.dumps(c.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
