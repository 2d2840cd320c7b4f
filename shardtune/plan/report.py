"""Human-readable and JSON renderings of an Estimate and of an auto-plan SearchResult.

Text uses rich tables rendered to a string (plain characters when the output is not a terminal), so the same
function serves the CLI and tests. JSON carries every number in bytes / seconds.
"""

from __future__ import annotations

import io
import json

from shardtune.hardware import GiB
from shardtune.plan.estimate import Estimate


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _console(color: bool):
    from rich.console import Console
    buf = io.StringIO()
    con = Console(file=buf, width=110, color_system="auto" if color else None, force_terminal=color,
                  highlight=False, soft_wrap=False)
    return con, buf


def setup_line(est: Estimate) -> str:
    s = est.setup
    targets = s.lora_targets if isinstance(s.lora_targets, str) else ",".join(s.lora_targets)
    lora = "" if s.method == "full" else f", LoRA r={s.lora_rank} on {targets} (dropout {s.lora_dropout:g})"
    loss = {"liger": "fused (Liger)", "chunked": "fused (chunked)", "none": "full logits"}[s.fused_loss]
    return (f"{s.label} {s.precision}{lora}; kernels {s.kernels}; loss {loss}; "
            f"{est.memory.trainable_params / 1e6:,.1f}M trainable parameters")


def model_line(est: Estimate) -> str:
    sh = est.shape
    return (f"{sh.name} ({sh.model_type}: {sh.params_total / 1e9:.2f}B parameters, {sh.layers} layers, hidden "
            f"{sh.hidden}, vocab {sh.vocab}) on {est.hardware.describe()}")


def render_estimate(est: Estimate, color: bool = False) -> str:
    from rich.table import Table
    con, buf = _console(color)
    m, sp = est.memory, est.speed
    con.print(model_line(est))
    con.print(f"setup: {setup_line(est)}")
    t = Table(title=f"memory per GPU (at the peak: {m.peak_phase})", title_justify="left")
    t.add_column("component")
    t.add_column("GiB", justify="right")
    for k, v in m.gpu.items():
        if v:
            t.add_row(k, _gib(v))
    t.add_section()
    t.add_row("peak allocated (torch)", _gib(m.peak_allocated))
    t.add_row("peak reserved (torch)", _gib(m.peak_reserved))
    t.add_row("on the device (reserved + context)", _gib(m.device_total))
    usable = est.usable_bytes
    t.add_row(f"usable: {_gib(m.budget)} GiB - {est.margin:.0%} margin", _gib(usable))
    con.print(t)
    c = Table(title="CPU RAM per node", title_justify="left")
    c.add_column("component")
    c.add_column("GiB", justify="right")
    for k, v in m.cpu.items():
        c.add_row(k, _gib(v))
    c.add_section()
    have = "unknown (--cpu-ram)" if m.cpu_budget is None else _gib(m.cpu_budget)
    c.add_row("total / available", f"{_gib(m.cpu_total)} / {have}")
    con.print(c)
    con.print(f"load-time peak: CPU {_gib(m.load_peak_cpu_per_rank)} GiB per rank, GPU {_gib(m.load_peak_gpu)} GiB")
    if est.invalid:
        verdict = f"CANNOT RUN: {est.invalid}"
    elif est.fits_with_margin:
        verdict = (f"FITS: {_gib(est.headroom_bytes)} GiB free per GPU at the predicted peak "
                   f"({_gib(usable - m.usage_vs_budget)} GiB beyond the {est.margin:.0%} margin)")
    elif est.fits:
        verdict = (f"FITS, TIGHT: {_gib(est.headroom_bytes)} GiB free per GPU at the predicted peak, less than the "
                   f"{est.margin:.0%} margin ({_gib(m.budget - usable)} GiB) kept for the planner's error; a "
                   "smaller micro batch or checkpointing gives room")
    else:
        verdict = f"DOES NOT FIT: {est.why_not()}"
    con.print(verdict)
    parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sp.parts_s.items() if v >= 5e-4)
    con.print(f"speed: {sp.step_s:.3f} s per optimizer step ({est.setup.global_batch} x {est.setup.seq_len} "
              f"tokens), {sp.tokens_per_s:,.0f} tokens/s on {est.setup.world_size} GPU(s), MFU {sp.mfu:.2f}, "
              f"{sp.bound}-bound")
    con.print(f"  step time by part: {parts}")
    for n in est.notes:
        con.print(f"note: {n}")
    return buf.getvalue()


def render_search(res, color: bool = False, rejected_limit: int = 12) -> str:
    from rich.table import Table
    con, buf = _console(color)
    out = [render_estimate(res.best, color)]
    con.print(f"auto plan: the fastest of {res.considered} configurations that fits "
              f"(global batch {res.global_batch} sequences):")
    con.print(f"  chosen:    {res.best.setup.label} -> {res.best.speed.tokens_per_s:,.0f} tokens/s")
    if res.runner_up is not None:
        con.print(f"  runner-up: {res.runner_up.setup.label} -> {res.runner_up.speed.tokens_per_s:,.0f} tokens/s "
                  f"({res.runner_up_why})")
    for n in res.notes:
        if n not in res.best.notes:   # the chosen setup's own notes were printed with it
            con.print(f"note: {n}")
    if res.rejected:
        t = Table(title=f"rejected ({len(res.rejected)}; first {min(rejected_limit, len(res.rejected))})",
                  title_justify="left")
        t.add_column("configuration")
        t.add_column("why")
        for st, why in res.rejected[:rejected_limit]:
            t.add_row(st.label, why or "")
        con.print(t)
    s = res.best.setup
    con.print("run it with: " + " ".join(config_overrides(s)))
    out.append(buf.getvalue())
    return "".join(out)


def config_overrides(s) -> list[str]:
    """The `key=value` overrides that make a config run setup `s`."""
    return [f"train.method={s.method}", f"parallel.strategy={s.strategy}", f"parallel.zero_stage={s.zero_stage}",
            f"parallel.offload_optimizer={str(s.offload_optimizer).lower()}",
            f"parallel.offload_param={str(s.offload_param).lower()}",
            f"train.gradient_checkpointing={str(s.grad_ckpt).lower()}", f"train.micro_batch_size={s.micro_batch}",
            f"train.grad_accum={s.grad_accum}"] + (
        [f"train.checkpoint_layers={s.ckpt_layers}"] if s.grad_ckpt and s.ckpt_layers else []) + (
        ["train.fused_lora=true"] if s.fused_lora else [])


def plan_dict(est: Estimate | None, suggestions: list[str], auto: dict | None = None) -> dict:
    """The one JSON shape of `shardtune plan --json` (docs/planner.md, "JSON output"): the estimate of the config
    (manual) or of the chosen one (auto), `suggestions` when it does not fit, the overrides that run it, and with
    --auto an added `auto` section."""
    d = est.to_dict() if est is not None else {"fits": False}
    d["suggestions"] = list(suggestions)
    d["overrides"] = config_overrides(est.setup) if est is not None else []
    if auto is not None:
        d["auto"] = auto
    return d


def auto_section(res) -> dict:
    """What --auto adds: it found a setup, the runner-up and why it is slower, what it considered and rejected."""
    return {"found": True, "error": None, "global_batch": res.global_batch, "considered": res.considered,
            "runner_up": res.runner_up.to_dict() if res.runner_up else None, "runner_up_why": res.runner_up_why,
            "notes": list(res.notes),
            "rejected": [{"label": s.label, "setup": s.to_dict(), "reason": r} for s, r in res.rejected]}


def auto_failed_section(err) -> dict:
    """--auto found nothing that fits with the margin: the error; the top level then shows the leanest setup."""
    return {"found": False, "error": str(err), "global_batch": None, "considered": None, "runner_up": None,
            "runner_up_why": "", "notes": [], "rejected": []}


def estimate_json(est: Estimate, suggestions: list[str] = ()) -> str:
    return json.dumps(plan_dict(est, list(suggestions)), indent=1)


def search_json(res) -> str:
    return json.dumps(plan_dict(res.best, [], auto_section(res)), indent=1)
