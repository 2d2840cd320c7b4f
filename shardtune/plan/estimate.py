"""`estimate(cfg, hw)`: the planner's library entry point -- memory per GPU and CPU, speed, fits or not.

The training loop calls it to print the prediction before loading and `Estimate.check_measured` after the first
steps to compare with the measured per-rank peak (warn when they differ by more than 15%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardtune.hardware import GiB, Hardware, hardware_for
from shardtune.model.shapes import ModelShape
from shardtune.plan.gguf_shape import plan_shape
from shardtune.plan.constants import DEFAULT_CONSTANTS, PlanConstants
from shardtune.plan.cpu_ram import cpu_need_line
from shardtune.plan.memory import MemoryEstimate, predict_memory
from shardtune.plan.setup import TrainSetup, setup_from_config
from shardtune.plan.speed import SpeedEstimate, predict_speed


@dataclass
class Estimate:
    shape: ModelShape
    hardware: Hardware
    setup: TrainSetup
    memory: MemoryEstimate
    speed: SpeedEstimate
    margin: float = 0.1
    invalid: str | None = None        # why the setup cannot run at all (then memory/speed are still filled in)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """The predicted peak is within the device (GPU memory, or the per-process cap) and CPU RAM. The margin does
        not flip this verdict; it marks the fit `tight` (see `headroom_bytes`)."""
        m = self.memory
        return self.invalid is None and m.usage_vs_budget <= m.budget and m.cpu_fits()

    @property
    def fits_with_margin(self) -> bool:
        """Fits with plan.margin of the device left free: what `plan: auto` requires of what it picks."""
        return self.invalid is None and self.memory.fits(self.margin)

    @property
    def tight(self) -> bool:
        return self.fits and not self.fits_with_margin

    @property
    def headroom_bytes(self) -> int:
        """Device memory left at the predicted peak (negative: over)."""
        return int(self.memory.budget - self.memory.usage_vs_budget)

    @property
    def usable_bytes(self) -> int:
        return int((1 - self.margin) * self.memory.budget)

    def why_not(self) -> str | None:
        """One phrase: why this setup does not fit the device (None when it does)."""
        if self.invalid:
            return self.invalid
        m = self.memory
        if m.usage_vs_budget > m.budget:
            return (f"needs {m.usage_vs_budget / GiB:.1f} GiB per GPU, the GPU has {m.budget / GiB:.1f} GiB: over by "
                    f"{(m.usage_vs_budget - m.budget) / GiB:.1f} GiB")
        return self._cpu_why_not()

    def why_not_with_margin(self) -> str | None:
        """One phrase: why `plan: auto` would not pick this setup (None when it fits with the margin)."""
        if self.invalid:
            return self.invalid
        m = self.memory
        if m.usage_vs_budget > self.usable_bytes:
            return (f"needs {m.usage_vs_budget / GiB:.1f} GiB per GPU, {self.usable_bytes / GiB:.1f} GiB usable "
                    f"({m.budget / GiB:.1f} GiB - {self.margin:.0%} margin): over by "
                    f"{(m.usage_vs_budget - self.usable_bytes) / GiB:.1f} GiB")
        return self._cpu_why_not()

    def _cpu_why_not(self) -> str | None:
        m = self.memory
        if not m.cpu_fits():
            return cpu_need_line(m.cpu_need, m.cpu_budget)
        return None

    def check_measured(self, peak_reserved_bytes: float, peak_allocated_bytes: float | None = None,
                       tolerance: float = 0.15) -> str | None:
        """A warning line when a measured per-rank peak differs from the prediction by more than `tolerance`."""
        msgs = []
        for what, meas, pred in (("reserved", peak_reserved_bytes, self.memory.peak_reserved),
                                 ("allocated", peak_allocated_bytes, self.memory.peak_allocated)):
            if meas is None or meas <= 0:
                continue
            err = pred / meas - 1
            if abs(err) > tolerance:
                msgs.append(f"peak {what} {meas / GiB:.2f} GiB measured vs {pred / GiB:.2f} GiB planned "
                            f"({err:+.0%})")
        if not msgs:
            return None
        return "plan vs measured: " + "; ".join(msgs) + " (please report with `shardtune plan --json` output)"

    def to_dict(self) -> dict:
        return {"model": self.shape.summary(), "hardware": self.hardware.to_dict(), "setup": self.setup.to_dict(),
                "label": self.setup.label, "fits": self.fits, "tight": self.tight,
                "fits_with_margin": self.fits_with_margin, "headroom_bytes": self.headroom_bytes,
                "margin": self.margin, "invalid": self.invalid, "why_not": self.why_not(),
                "usable_bytes": self.usable_bytes, "memory": self.memory.to_dict(),
                "speed": self.speed.to_dict(), "notes": list(self.notes)}


def context_warnings(shape: ModelShape, setup: TrainSetup) -> list[str]:
    """A sequence longer than the model was trained for plans fine but trains on positions it never saw."""
    if shape.max_position and setup.seq_len > int(shape.max_position):
        return [f"warning: data.max_seq_len={setup.seq_len} is longer than {shape.name}'s max_position_embeddings "
                f"({int(shape.max_position)}): positions past it were never trained; use data.max_seq_len <= "
                f"{int(shape.max_position)} or a long-context variant of the model"]
    return []


def estimate_setup(shape: ModelShape, setup: TrainSetup, hw: Hardware, margin: float = 0.1,
                   constants: PlanConstants = DEFAULT_CONSTANTS) -> Estimate:
    mem = predict_memory(shape, setup, hw, constants)
    spd = predict_speed(shape, setup, hw, constants)
    notes = context_warnings(shape, setup) + list(mem.notes) + list(spd.notes)
    return Estimate(shape=shape, hardware=hw, setup=setup, memory=mem, speed=spd, margin=margin,
                    invalid=setup.invalid_reason(), notes=notes)


def estimate(cfg, hw: Hardware | None = None, *, constants: PlanConstants = DEFAULT_CONSTANTS,
             kernels: str | None = None, fused_loss: str | None = None, shape: ModelShape | None = None,
             stack: dict | None = None) -> Estimate:
    """Predict memory and speed of `cfg` (a RunConfig) on `hw` (default: plan.gpus, else the detected GPUs).
    `kernels` ('liger'|'none') and `fused_loss` ('liger'|'chunked'|'none') override what the planner infers, for
    callers that know what actually runs (the trainer). `stack`: a stack profile (plan.setup.STACKS), e.g.
    {"stack": "hf", "lora_dtype": "bf16", "optimizer": "paged_adamw_32bit"} for the QLoRA paper's script."""
    if hw is None:
        hw = hardware_for(cfg.plan.gpus)
    if shape is None:
        shape = plan_shape(cfg.model)
    setup = setup_from_config(cfg, hw, model_type=shape.model_type, kernels=kernels, fused_loss=fused_loss,
                              stack=stack)
    return estimate_setup(shape, setup, hw, cfg.plan.margin, constants)
