"""The training loop: one code path for 1 process or N ranks; the engine (shardtune.parallel) hides the sharding.

Per optimizer step every rank takes its share of one global batch (micro_batch x grad_accum x world samples, chosen
by a seeded permutation that depends only on the step, so resume needs no sampler state). The loss of a micro batch
is its summed token loss divided by the target-token count of the whole global batch, which makes the update
independent of how the global batch is split over ranks and micro steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shardtune.errors import ConfigError
from shardtune.parallel import dist_info_from_env, make_engine, resolve_strategy
from shardtune.train import checkpoint as ckpt
from shardtune.train.loss import can_fuse, fused_loss_sum, head_fused_loss_sum, logits_loss_sum
from shardtune.train.metrics import MetricsLog, peak_memory_gb, plot_losses


@dataclass
class TrainResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)          # train loss of every optimizer step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_gb: tuple[float, float] = (0.0, 0.0)
    adapter_dir: Path | None = None


class GlobalBatches:
    """Sample indices of global batch `step`: a stream of per-epoch permutations (seed + epoch), cut in slices."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.g, self.seed = n, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.g
        return [int(self._perm((start + i) // self.n)[(start + i) % self.n]) for i in range(self.g)]


def micro_batches(global_idx: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This rank's micro batches: the global batch dealt round-robin over ranks, then cut into micro batches."""
    mine = global_idx[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}




def _targets(sample: dict) -> int:
    return sum(1 for t in sample["labels"][1:] if t != -100)


class Trainer:
    def __init__(self, cfg, out=print, time_steps: bool = False):
        self.cfg = cfg
        self.say_raw = out
        self.time_steps = time_steps  # benchmarks: synchronise and record every step's wall time
        self.step_times: list[float] = []

    def use_samples(self, train: list[dict], val: list[dict] | None = None) -> None:
        """Replace the data set after setup (benchmarks feed pre-tokenised random samples)."""
        self.train_set, self.val_set = train, list(val or [])
        self.targets = [_targets(s) for s in train]
        self.batches = GlobalBatches(len(train), self.global_batch, self.cfg.train.seed)

    def say(self, msg: str) -> None:
        if self.dist.is_main:
            self.say_raw(msg)

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from shardtune.data.pipeline import build_datasets, collate
        from shardtune.model.load import (load_tokenizer, read_model_config, resolve_device, resolve_model_dir,
                                          resolve_precision, trainable_summary)
        from shardtune.resolve import with_deepspeed_json
        cfg = self.cfg = with_deepspeed_json(self.cfg)  # a DeepSpeed JSON's values for keys the user did not set
        self.dist = dist_info_from_env()
        self.device = resolve_device(cfg.train, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.dist.world_size > 1:
            from shardtune.parallel.launch import init_distributed
            init_distributed(self.dist, self.device)
        if self.device.type == "cpu" and self.dist.world_size > 1:
            # ranks sharing a CPU must not each spin up a thread per core (oversubscription is ~7x slower here)
            import os
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        self.dtype = resolve_precision(cfg.train, self.device)
        cfg = self.cfg = self._plan(cfg)
        self.strategy = resolve_strategy(cfg, self.dist.world_size)
        self.out = Path(cfg.output.dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

        self.model_dir = resolve_model_dir(cfg.model)
        read_model_config(self.model_dir, cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        splits = build_datasets(cfg.data, self.tokenizer, cfg.train.seed)
        self.train_set, self.val_set, self.data_stats = splits.train, splits.val, splits.stats
        from shardtune.data.pipeline import format_stats
        self.say(format_stats(splits.stats))
        self.collate = lambda samples: collate(samples, self.tokenizer.pad_token_id)
        self.targets = [_targets(s) for s in self.train_set]

        t = cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum * self.dist.world_size
        if t.max_steps > 0:
            self.total_steps = t.max_steps
        else:
            self.total_steps = max(1, math.ceil(t.epochs * len(self.train_set) / self.global_batch))
        self.batches = GlobalBatches(len(self.train_set), self.global_batch, t.seed)

        self.say(f"shardtune: {cfg.train.method} on {self.model_dir.name} | {self.strategy} x{self.dist.world_size} "
                 f"{self.device.type} {str(self.dtype).replace('torch.', '')} | {len(self.train_set)} train / "
                 f"{len(self.val_set)} val samples | global batch {self.global_batch} "
                 f"({t.micro_batch_size} x {t.grad_accum} accum x {self.dist.world_size} ranks) | {self.total_steps} steps")

        torch.manual_seed(t.seed)
        self.engine = make_engine(cfg, self.dist, self.device, self.dtype)
        model = self.engine.build_model(self.model_dir)
        report = getattr(model, "load_report", None)
        if report is not None:
            from shardtune.model.load_report import gather_load_reports
            reports = gather_load_reports(report) if self.dist.world_size > 1 else [report]
            for r in reports:
                self.say("load: " + r.format())
        trainable, total = trainable_summary(model)
        from shardtune.model.kernels import apply_kernels
        self.kernels = apply_kernels(model, t.kernels, self.device)
        self.model = self.engine.setup(model, self.total_steps)
        # the fused loss: the one-process engine calls the decoder directly; wrapped engines swap the output
        # layer's forward for one that returns the loss (their hooks keep running)
        self.fused = t.fused_loss and can_fuse(self.model)
        self.say(f"kernels: {self.kernels}; loss: {'fused' if self.fused else 'logits'}")
        if cfg.plan.mode != "auto" and self.device.type == "cuda":
            self._predict(cfg)
        self.say(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        if self.dist.world_size > 1:
            from shardtune.parallel.balance import check_balance
            check_balance(self.engine, cfg.parallel.balance_tolerance)

        self.start_step = 0
        if t.resume:
            last = ckpt.latest_checkpoint(self.out)
            if last is None:
                self.say(f"resume: no complete checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            else:
                engine_file = last / ckpt.ENGINE_FILE
                if engine_file.is_file():
                    problem = ckpt.resume_problem(json.loads(engine_file.read_text()), self.strategy,
                                                  self.dist.world_size)
                    if problem:
                        raise ConfigError(f"train.resume: cannot continue from {last}: {problem}")
                client = self.engine.load_checkpoint(last)
                self.start_step = int(client["step"])
                self.say(f"resume: continuing from {last} (step {self.start_step})")

    def loss_sum(self, batch: dict) -> torch.Tensor:
        if self.fused and self.engine.name == "none":
            return fused_loss_sum(self.model, batch, self.dtype, self.device)
        if self.fused:
            return head_fused_loss_sum(self.model, batch, self.dtype, self.device)
        return logits_loss_sum(self.model, batch, self.dtype, self.device)

    def _plan(self, cfg):
        """`plan: auto` replaces the config with the planner's fastest fitting choice (printed before anything is
        loaded) and keeps its prediction; manual configs are predicted once the kernels are known (`_predict`)."""
        self.estimate = None
        if cfg.plan.mode == "auto":
            from shardtune.hardware import hardware_for
            from shardtune.plan import auto_plan
            hw = hardware_for(cfg.plan.gpus)
            result = auto_plan(cfg, hw)
            self.say("plan: auto chose " + result.summary())
            cfg = result.config
            self.estimate = result.best
            self._say_prediction()
        return cfg

    def _predict(self, cfg) -> None:
        """The plan's memory prediction for the config that runs, with the kernels and loss path it actually uses;
        compared with the measured peak after the first logged steps."""
        try:
            from shardtune.hardware import hardware_for
            from shardtune.plan import estimate
            from shardtune.train.loss import _liger_flce
            loss_path = ("liger" if _liger_flce() else "chunked") if self.fused else "none"
            self.estimate = estimate(cfg, hardware_for(cfg.plan.gpus), kernels=self.kernels, fused_loss=loss_path)
        except Exception as e:  # the plan is advice; a shape it cannot read must not stop training
            self.say(f"plan: no prediction for this model ({type(e).__name__}: {e})")
            return
        self._say_prediction()

    def _say_prediction(self) -> None:
        m = self.estimate.memory
        self.say(f"plan: {self.estimate.setup.label}: predicted peak {m.peak_allocated / 2**30:.2f} GiB allocated, "
                 f"{m.peak_reserved / 2**30:.2f} GiB reserved per GPU")

    def _check_plan(self) -> None:
        if self.estimate is None or self.device.type != "cuda" or getattr(self, "_plan_checked", False):
            return
        self._plan_checked = True
        warn = self.estimate.check_measured(torch.cuda.max_memory_reserved(self.device),
                                            torch.cuda.max_memory_allocated(self.device))
        if warn:
            self.say_raw(f"warning (rank {self.dist.rank}): {warn}")

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> float:
        if not self.val_set:
            return float("nan")
        model, world, rank, micro = self.model, self.dist.world_size, self.dist.rank, self.cfg.train.micro_batch_size
        model.eval()
        n_batches = math.ceil(len(self.val_set) / (world * micro))
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        toks = torch.zeros((), device=self.device, dtype=torch.float64)
        for b in range(n_batches):
            lo = (b * world + rank) * micro
            samples = self.val_set[lo:lo + micro]
            weight = 1.0
            if not samples:  # every rank must run the same number of forwards (sharded engines all-gather)
                samples, weight = self.val_set[:1], 0.0
            batch = _to(self.collate(samples), self.device)
            loss += weight * self.loss_sum(batch).double()
            toks += weight * (batch["labels"][:, 1:] != -100).sum()
        model.train()
        self.engine.all_reduce_sum(loss)
        self.engine.all_reduce_sum(toks)
        return (loss / toks.clamp(min=1)).item()

    # ------------------------------------------------------------------------------------------------ train
    def run(self) -> TrainResult:
        if not hasattr(self, "engine"):
            self.setup()
        cfg, t, dist, engine = self.cfg, self.cfg.train, self.dist, self.engine
        res = TrainResult(output_dir=self.out)
        log = MetricsLog(self.out, dist.is_main, cfg.output.tensorboard)
        if self.start_step == 0 and t.eval_every > 0 and self.val_set:
            ev = self.evaluate()
            res.eval_losses.append((0, ev))
            log.log(0, eval_loss=ev)
            self.say(f"step 0 eval_loss {ev:.4f}")

        progress = self._progress()
        self.model.train()
        t0 = time.perf_counter()
        win_t0, win_tokens = t0, torch.zeros((), device=self.device)
        win_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        win_targets = 0
        tokens_total = 0
        step = self.start_step
        try:
            for step in range(self.start_step, self.total_steps):
                if self.time_steps:
                    self._sync()
                    ts = time.perf_counter()
                gidx = self.batches.indices(step)
                gtargets = max(1, sum(self.targets[i] for i in gidx))
                mbs = micro_batches(gidx, dist.rank, dist.world_size, t.micro_batch_size)
                step_loss = torch.zeros((), device=self.device, dtype=torch.float64)
                for m, idx in enumerate(mbs):
                    batch = _to(self.collate([self.train_set[i] for i in idx]), self.device)
                    with engine.accumulating(m == len(mbs) - 1):
                        loss_sum = self.loss_sum(batch)
                        engine.backward(loss_sum / gtargets)
                    step_loss += loss_sum.detach().double()
                    win_tokens += (batch["attention_mask"].sum() if "attention_mask" in batch
                                   else batch["input_ids"].numel())
                grad_norm = engine.step()
                if self.time_steps:
                    self._sync()
                    self.step_times.append(time.perf_counter() - ts)
                # keep the per-step loss on device; summed over ranks only at log points (no host sync per step)
                res.losses.append(step_loss / gtargets)
                win_loss += step_loss
                win_targets += gtargets
                done = step + 1
                if progress:
                    progress.update(self._task, completed=done)
                if done % t.log_every == 0 or done == self.total_steps:
                    self._log_window(res, log, done, win_loss, win_targets, win_tokens, win_t0, grad_norm)
                    self._check_plan()
                    tokens_total += int(win_tokens.item() if torch.is_tensor(win_tokens) else win_tokens)
                    win_t0, win_tokens, win_targets = time.perf_counter(), torch.zeros((), device=self.device), 0
                    win_loss = torch.zeros((), device=self.device, dtype=torch.float64)
                if t.eval_every > 0 and self.val_set and (done % t.eval_every == 0 or done == self.total_steps):
                    ev = self.evaluate()
                    res.eval_losses.append((done, ev))
                    log.log(done, eval_loss=ev)
                    self.say(f"step {done} eval_loss {ev:.4f}")
                if t.save_every > 0 and done % t.save_every == 0 and done < self.total_steps:
                    self.save_checkpoint(done)
        except KeyboardInterrupt:
            if progress:
                progress.stop()
            last = ckpt.latest_checkpoint(self.out)
            self.say(f"interrupted at step {step}; the last complete checkpoint is {last or 'none'}; "
                     f"{self.out / 'adapter'} was not touched")
            log.close()
            raise
        if progress:
            progress.stop()
        res.seconds = time.perf_counter() - t0
        res.steps = self.total_steps - self.start_step
        res.losses = self._reduce_losses(res.losses)
        res.peak_mem_gb = peak_memory_gb(self.device)
        res.tokens_per_s = tokens_total * dist.world_size / max(res.seconds, 1e-9)
        res.adapter_dir = self.save_final(res)
        log.close()
        if dist.is_main and cfg.output.plot:
            plot_losses(log.rows, self.out / "loss.png")
        return res

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _reduce_losses(self, losses: list) -> list[float]:
        if not losses:
            return []
        t = torch.stack([torch.as_tensor(x, device=self.device, dtype=torch.float64) for x in losses])
        return [float(x) for x in self.engine.all_reduce_sum(t).cpu()]

    def _log_window(self, res, log, done, win_loss, win_targets, win_tokens, win_t0, grad_norm) -> None:
        loss = self.engine.all_reduce_sum(win_loss.clone()).item() / max(win_targets, 1)
        tokens = self.engine.all_reduce_sum(torch.as_tensor(win_tokens, device=self.device).float()).item()
        dt = time.perf_counter() - win_t0
        alloc, reserved = peak_memory_gb(self.device)
        gn = float(grad_norm)
        row = dict(loss=loss, lr=self.engine.lr(), grad_norm=gn, tokens_per_s=tokens / max(dt, 1e-9),
                   peak_alloc_gb=alloc, peak_reserved_gb=reserved)
        log.log(done, **row)
        self.say(f"step {done}/{self.total_steps} loss {loss:.4f} lr {row['lr']:.2e} grad_norm {gn:.3f} "
                 f"tok/s {row['tokens_per_s']:.0f} mem {reserved:.2f} GB")

    def _progress(self):
        if not self.dist.is_main or not sys.stderr.isatty():
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
        p = Progress("[bold]train", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
        self._task = p.add_task("train", total=self.total_steps, completed=self.start_step)
        p.start()
        self.say_raw = p.console.print
        return p

    # ------------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self, step: int) -> Path:
        d = ckpt.step_dir(self.out, step)
        if self.dist.is_main:
            d.mkdir(parents=True, exist_ok=True)
        self.engine.barrier()
        self.engine.save_checkpoint(d, {"step": step})
        if self.dist.is_main:
            ckpt.write_json_atomic(d / ckpt.ENGINE_FILE, {"strategy": self.strategy, "world_size": self.dist.world_size})
        sd = self.engine.trainable_state_dict()
        if self.dist.is_main:
            ckpt.save_adapter(self.engine.unwrapped(), sd, self.tokenizer, d / "adapter",
                              full=self.cfg.train.method == "full")
        self.engine.barrier()
        if self.dist.is_main:
            (d / ckpt.COMPLETE).write_text(str(step))
            ckpt.prune_checkpoints(self.out)
            self.say(f"checkpoint: {d}")
        return d

    def save_final(self, res: TrainResult) -> Path:
        sd = self.engine.trainable_state_dict()
        final = self.out / "adapter"
        if self.dist.is_main:
            ckpt.save_adapter(self.engine.unwrapped(), sd, self.tokenizer, final, full=self.cfg.train.method == "full")
            ckpt.write_json_atomic(self.out / "shardtune_run.json", {
                "config": self.cfg.to_dict(), "base_model_dir": str(self.model_dir.resolve()),
                "method": self.cfg.train.method, "precision": str(self.dtype).replace("torch.", ""),
                "strategy": self.strategy, "world_size": self.dist.world_size, "steps": self.total_steps,
                "first_train_loss": res.losses[0] if res.losses else None,
                "final_train_loss": res.losses[-1] if res.losses else None,
                "eval_losses": res.eval_losses, "seconds": round(res.seconds, 2),
                "tokens_per_s": round(res.tokens_per_s, 1), "data": self.data_stats,
            })
            self.say(f"adapter saved to {final} ({res.seconds:.1f} s, {res.tokens_per_s:.0f} tok/s)")
        self.engine.barrier()
        return final


def train(cfg, out=print) -> TrainResult:
    return Trainer(cfg, out=out).run()
