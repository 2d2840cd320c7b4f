"""`auto_plan`: the fastest predicted configuration that fits, the runner-up and why it is slower, and why every
other candidate was rejected. When nothing fits: DoesNotFit naming the smallest change that would (another
method on the same GPUs, more GPUs, or both).

Searched: strategy (none/ddp/fsdp/fsdp-zero2/zero2/zero3), CPU offload, gradient checkpointing, micro batch with
gradient accumulation for the global batch, and the method only when the caller allows it (`search_method`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardtune.errors import DoesNotFit
from shardtune.hardware import GiB, Hardware, hardware_for
from shardtune.model.shapes import ModelShape
from shardtune.plan.gguf_shape import plan_shape
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.estimate import Estimate, context_warnings, estimate_setup
from shardtune.plan.setup import (TrainSetup, apply_setup, fixed_by_deepspeed_json, liger_on_target,
                                  setup_from_config)
from shardtune.resolve import resolve_loss_path

# (strategy, zero_stage, offload_optimizer, offload_param)
SINGLE_GPU = [("none", 3, False, False), ("deepspeed", 2, True, False), ("deepspeed", 3, True, False),
              ("deepspeed", 3, True, True), ("fsdp", 3, True, True)]
MULTI_GPU = [("ddp", 3, False, False), ("fsdp", 3, False, False), ("fsdp", 2, False, False),
             ("deepspeed", 2, False, False), ("deepspeed", 3, False, False), ("deepspeed", 2, True, False),
             ("deepspeed", 3, True, False), ("deepspeed", 3, True, True), ("fsdp", 3, True, True)]
# methods in order of how far they move from each starting method (the "smallest change")
METHOD_ALTERNATIVES = {"full": ["lora", "qlora"], "lora": ["qlora"], "int8": ["qlora"], "qlora": []}
MAX_MICRO_BATCH = 64


@dataclass
class SearchResult:
    best: Estimate
    runner_up: Estimate | None
    runner_up_why: str
    rejected: list[tuple[TrainSetup, str]]
    considered: int
    config: object                      # the RunConfig to run (a copy of the input with the best setup applied)
    global_batch: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        b = self.best
        lines = [f"plan: {b.setup.label} -> {b.speed.tokens_per_s:,.0f} tokens/s, "
                 f"{b.memory.usage_vs_budget / GiB:.1f} of {b.usable_bytes / GiB:.1f} GiB usable per GPU"]
        if self.runner_up is not None:
            lines.append(f"runner-up: {self.runner_up.setup.label} -> {self.runner_up.speed.tokens_per_s:,.0f} "
                         f"tokens/s ({self.runner_up_why})")
        lines.append(f"considered {self.considered} configurations, {len(self.rejected)} rejected")
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        return {"best": self.best.to_dict(), "runner_up": self.runner_up.to_dict() if self.runner_up else None,
                "runner_up_why": self.runner_up_why, "considered": self.considered,
                "global_batch": self.global_batch, "notes": list(self.notes),
                "rejected": [{"label": s.label, "setup": s.to_dict(), "reason": r} for s, r in self.rejected]}


def _strategies(world: int) -> list[tuple[str, int, bool, bool]]:
    return SINGLE_GPU if world == 1 else MULTI_GPU


def _micro_batches(per_rank: int, max_micro: int) -> list[int]:
    return [m for m in range(1, min(per_rank, max_micro) + 1) if per_rank % m == 0]


def global_batch_for(cfg, world: int) -> tuple[int, list[str]]:
    """plan.global_batch_size, or the config's micro x accum x world; rounded up to a multiple of the GPUs."""
    notes = []
    g = cfg.plan.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum * world
    if g % world:
        g2 = math.ceil(g / world) * world
        notes.append(f"global batch {g} is not a multiple of {world} GPUs; using {g2}")
        g = g2
    return g, notes


def candidates(base: TrainSetup, methods: list[str], world: int, gpus_per_node: int, global_batch: int,
               model_type: str, fused_pref: bool, liger: bool, max_micro: int = MAX_MICRO_BATCH,
               layers: int = 0) -> list[TrainSetup]:
    """Every setup auto weighs. With the model's depth (`layers`), checkpointing a quarter, half or three quarters
    of the layers joins none and all: between the two in memory and in time."""
    out = []
    ckpts = [(False, 0), (True, 0)] + [(True, k) for k in sorted({layers // 4, layers // 2, 3 * layers // 4})
                                       if 0 < k < layers]
    # fused LoRA (less memory, more element-wise traffic) where the engine allows it: auto weighs both paths
    lora_paths = (False, True) if base.stack == "shardtune" and base.lora_dropout > 0 else (False,)
    per_rank = global_batch // world
    for method in methods:
        for strategy, stage, off_opt, off_par in _strategies(world):
            fused = resolve_loss_path(fused_pref, model_type, liger)
            for ckpt, ckpt_layers, fused_lora in [(a, b, fl) for a, b in ckpts for fl in lora_paths]:
                for micro in _micro_batches(per_rank, max_micro):
                    out.append(base.replace(method=method, strategy=strategy, zero_stage=stage,
                                            offload_optimizer=off_opt, offload_param=off_par, world_size=world,
                                            gpus_per_node=gpus_per_node, micro_batch=micro,
                                            grad_accum=per_rank // micro, grad_ckpt=ckpt, ckpt_layers=ckpt_layers,
                                            fused_loss=fused, fused_lora=fused_lora))
    return out


def _why_slower(best: Estimate, other: Estimate) -> str:
    """The setup differences and the cost part that grew most, in one phrase."""
    a, b = best.setup, other.setup
    diffs = []
    for name, fmt in (("method", "{}"), ("strategy", "{}"), ("zero_stage", "zero {}"), ("grad_ckpt", "ckpt {}"),
                      ("ckpt_layers", "ckpt layers {}"), ("fused_lora", "fused lora {}"),
                      ("micro_batch", "micro {}"), ("offload_optimizer", "opt offload {}"),
                      ("offload_param", "param offload {}")):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            diffs.append(fmt.format(_onoff(vb)))
    pa, pb = best.speed.parts_s, other.speed.parts_s
    grew = max(pb, key=lambda k: pb[k] - pa.get(k, 0.0))
    delta = pb[grew] - pa.get(grew, 0.0)
    slower = best.speed.tokens_per_s / max(other.speed.tokens_per_s, 1e-9) - 1
    what = ", ".join(diffs) or "same settings"
    if delta < 5e-4:
        return f"{slower:.1%} slower: {what}; predicted equal within the model's resolution"
    return f"{slower:.1%} slower: {what}; +{delta * 1000:.0f} ms/step in {grew}"


def _onoff(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def _search(shape: ModelShape, base: TrainSetup, hw: Hardware, methods: list[str], global_batch: int,
            margin: float, c: PlanConstants, fused_pref: bool, liger: bool, max_micro: int = MAX_MICRO_BATCH,
            fixed: dict | None = None):
    fits, rejected = [], []
    cands = candidates(base, methods, hw.world_size, hw.gpus_per_node, global_batch, shape.model_type, fused_pref,
                       liger, max_micro, layers=shape.layers)
    if fixed:  # fields the search may not change (a DeepSpeed JSON's engine, stage, offloads, batch shape)
        cands = [st for st in cands if all(getattr(st, k) == v for k, v in fixed.items())]
    near: list[tuple[float, TrainSetup, str]] = []
    for st in cands:
        if st.invalid_reason():
            near.append((math.inf, st, st.invalid_reason()))
            continue
        est = estimate_setup(shape, st, hw, margin, c)
        if est.fits_with_margin:
            fits.append(est)
        else:
            near.append((est.memory.usage_vs_budget, st, est.why_not_with_margin()))
    near.sort(key=lambda t: t[0])          # the nearly-fitting first, setups that cannot run at all last
    rejected = [(st, why) for _, st, why in near]
    fits.sort(key=lambda e: (-e.speed.tokens_per_s, e.memory.usage_vs_budget))
    if fits:
        # predictions within 0.5% are a tie: prefer the simpler engine, no offload, fewer accumulation steps
        top = fits[0].speed.tokens_per_s
        tied = [e for e in fits if e.speed.tokens_per_s >= 0.995 * top]
        tied.sort(key=_preference)
        fits = tied + [e for e in fits if e not in tied]
        if hw.world_size == 1:
            # on one GPU an engine or offload can only add work: take it only when the plain setup does not fit
            # or is predicted clearly (>5%) slower
            plain = [e for e in fits if e.setup.strategy == "none" and not e.setup.offload_optimizer
                     and not e.setup.offload_param]
            if plain and fits[0] not in plain and fits[0].speed.tokens_per_s < 1.05 * plain[0].speed.tokens_per_s:
                fits = plain + [e for e in fits if e not in plain]
    return fits, rejected, len(cands)


STRATEGY_ORDER = {("none", 2): 0, ("none", 3): 0, ("ddp", 2): 1, ("ddp", 3): 1, ("fsdp", 3): 2, ("fsdp", 2): 3,
                  ("deepspeed", 2): 4, ("deepspeed", 3): 5}


def _preference(e: Estimate) -> tuple:
    s = e.setup
    return (STRATEGY_ORDER.get((s.strategy, s.zero_stage), 9), int(s.offload_optimizer) + int(s.offload_param),
            s.grad_accum, -e.speed.tokens_per_s)


def _leanest(shape: ModelShape, base: TrainSetup, hw: Hardware, method: str, margin: float,
             c: PlanConstants) -> Estimate | None:
    """For a quick yes/no on `method` x `hw`: among the lean setups (micro batch 1, checkpointing on, every
    strategy and offload), the fastest that fits, else the least memory-hungry one; None if none is valid."""
    fitting, best_mem = None, None
    liger = base.fused_loss == "liger" or base.kernels == "liger"
    for strategy, stage, off_opt, off_par in _strategies(hw.world_size):
        st = base.replace(method=method, strategy=strategy, zero_stage=stage, offload_optimizer=off_opt,
                          offload_param=off_par, world_size=hw.world_size, gpus_per_node=hw.gpus_per_node,
                          micro_batch=1, grad_accum=1, grad_ckpt=True,
                          fused_loss=resolve_loss_path(base.fused_loss != "none", shape.model_type, liger))
        if st.invalid_reason():
            continue
        est = estimate_setup(shape, st, hw, margin, c)
        if est.fits_with_margin and (fitting is None or est.speed.tokens_per_s > fitting.speed.tokens_per_s):
            fitting = est
        if best_mem is None or est.memory.usage_vs_budget < best_mem.memory.usage_vs_budget:
            best_mem = est
    return fitting or best_mem


def _describe_fix(est: Estimate) -> str:
    m = est.memory
    cpu = ""
    if est.setup.offload_optimizer or est.setup.offload_param:
        cpu = f", {m.cpu_total / GiB:.0f} GiB CPU RAM per node"
    return (f"{est.setup.label}: {m.usage_vs_budget / GiB:.1f} GiB per GPU{cpu}, "
            f"~{est.speed.tokens_per_s:,.0f} tokens/s")


def _with_gpus(hw: Hardware, world: int) -> Hardware:
    per_node = min(world, max(hw.gpus_per_node, 8))
    return hw.with_world(per_node, max(1, math.ceil(world / per_node)))


def _fewest_gpus(shape, base, hw, method, margin, c, max_gpus) -> tuple[Hardware, Estimate] | None:
    for w in (2, 4, 8, 16, 32, 64, 128, 256):
        if hw.world_size < w <= max_gpus:
            hw2 = _with_gpus(hw, w)
            est = _leanest(shape, base, hw2, method, margin, c)
            if est is not None and est.fits_with_margin:
                return hw2, est
    return None


def smallest_change(shape: ModelShape, base: TrainSetup, hw: Hardware, margin: float,
                    c: PlanConstants = DEFAULT_CONSTANTS, max_gpus: int = 256) -> list[str]:
    """Ways to make `base` fit, smallest first: another engine for the same method on the same GPUs; another method
    on the same GPUs (the fastest that fits); then more GPUs of the same kind (same method, or another method when
    that needs fewer GPUs)."""
    out: list[str] = []
    # the same method on the same GPUs with another engine or offload (DeepSpeed's whole-model load, for one)
    other_engine = _leanest(shape, base, hw, base.method, margin, c)
    if other_engine is not None and other_engine.fits_with_margin and \
            (other_engine.setup.strategy, other_engine.setup.zero_stage) != (base.strategy, base.zero_stage):
        out.append(f"parallel.strategy={other_engine.setup.strategy} on the same {hw.world_size} GPU(s) "
                   f"({_describe_fix(other_engine)})")
    if base.strategy == "deepspeed" and base.zero_stage == 3 and not base.zero3_cpu_load:
        est = estimate_setup(shape, base.replace(zero3_cpu_load=True), hw, margin, c)
        if est.fits_with_margin:
            out.insert(0, f"parallel.zero3_load=cpu: load through CPU RAM ({_describe_fix(est)}, "
                          f"{est.memory.cpu_need / GiB:.0f} GiB of CPU RAM per node while loading)")
    alts = METHOD_ALTERNATIVES.get(base.method, [])
    same_gpus = [e for e in (_leanest(shape, base, hw, m, margin, c) for m in alts) if e is not None and e.fits_with_margin]
    if same_gpus:
        est = max(same_gpus, key=lambda e: e.speed.tokens_per_s)
        out.append(f"method={est.setup.method} on the same {hw.world_size} GPU(s) ({_describe_fix(est)})")
    more = []
    same = _fewest_gpus(shape, base, hw, base.method, margin, c, max_gpus)
    if same is not None:
        more.append((same[0].world_size, 1, f"{same[0].describe()} ({_describe_fix(same[1])})"))
    for m in alts:
        other = _fewest_gpus(shape, base, hw, m, margin, c, max_gpus)
        if other is not None and (same is None or other[0].world_size < same[0].world_size):
            more.append((other[0].world_size, 0, f"method={m} on {other[0].describe()} ({_describe_fix(other[1])})"))
            break
    out += [text for _, _, text in sorted(more)]
    return out


def auto_plan(cfg, hw: Hardware | None = None, *, search_method: bool = False,
              constants: PlanConstants = DEFAULT_CONSTANTS, max_micro_batch: int = MAX_MICRO_BATCH,
              stack: dict | None = None) -> SearchResult:
    """Fastest predicted configuration of `cfg` on `hw` whose per-GPU memory fits within (1 - plan.margin).
    Returns the chosen setup applied to a copy of `cfg`; raises DoesNotFit with the smallest change otherwise."""
    if hw is None:
        hw = hardware_for(cfg.plan.gpus)
    shape = plan_shape(cfg.model)
    base = setup_from_config(cfg, hw, model_type=shape.model_type, stack=stack)
    fused_pref = bool(getattr(cfg.train, "fused_loss", False)) and base.stack != "hf"
    liger = liger_on_target(hw)
    margin = cfg.plan.margin
    g, notes = global_batch_for(cfg, hw.world_size)
    notes = context_warnings(shape, base) + notes
    methods = [base.method] + ([m for m in ("qlora", "lora", "int8", "full") if m != base.method]
                               if search_method else [])
    fits, rejected, n = _search(shape, base, hw, methods, g, margin, constants, fused_pref, liger, max_micro_batch,
                                fixed_by_deepspeed_json(cfg))
    if not fits:
        lean = _leanest(shape, base, hw, base.method, margin, constants)
        need = (f"even the leanest ({lean.setup.label}) {lean.why_not_with_margin()}" if lean is not None
                else "no valid setup")
        ways = smallest_change(shape, base, hw, margin, constants)
        fix = ("smallest change that fits: " + "; or ".join(ways)) if ways else \
            "nothing up to 256 GPUs fits; use a smaller model or shorter sequences"
        err = DoesNotFit(f"{shape.name} {base.method} does not fit on {hw.describe()}: {need}; {fix}")
        err.suggestions = ways
        err.leanest = lean
        raise err
    best = fits[0]
    runner = fits[1] if len(fits) > 1 else None
    why = _why_slower(best, runner) if runner is not None else ""
    new_cfg = apply_setup(cfg, best.setup)
    new_cfg.plan.mode = "manual"          # the returned config is the plan; running it must not re-plan
    new_cfg.plan.global_batch_size = g
    return SearchResult(best=best, runner_up=runner, runner_up_why=why, rejected=rejected, considered=n,
                        config=new_cfg, global_batch=g, notes=notes)
