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

import torch

from shardtune.errors import ConfigError, Diverged, OutOfMemory, RankLost, Stopped, first_line
from shardtune.parallel import dist_info_from_env, make_engine, resolve_strategy
from shardtune.train import checkpoint as ckpt
from shardtune.train.batches import GlobalBatches, micro_batches, targets_of as _targets, to_device as _to
from shardtune.train.loss import can_fuse, fused_loss_sum, head_fused_loss_sum, logits_loss_sum
from shardtune.train.metrics import MetricsLog, peak_memory_gb, plot_losses
from shardtune.train.offload import activation_offloader
from shardtune.train.optim import build_optimizer, build_scheduler
from shardtune.train.preempt import StopRequests, lost_peer


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
    skipped_steps: int = 0                                   # updates skipped for a non-finite loss/grad norm


class Trainer:
    """`setup` is a list of short named steps (runtime, output, data, model, engine, resume); `run` is the loop."""

    def __init__(self, cfg, out=print, time_steps: bool = False):
        self.cfg = cfg
        self.say_raw = out
        self.time_steps = time_steps  # benchmarks: synchronise and record every step's wall time
        self.step_times: list[float] = []
        self.stops = StopRequests()

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
        self._setup_runtime()
        self._setup_output()
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._setup_resume()

    def _setup_runtime(self) -> None:
        """Ranks, device, process group, threads, precision, and `plan: auto`'s choice of config."""
        from shardtune.model.load import resolve_device, resolve_precision
        self.dist = dist_info_from_env()
        self.device = resolve_device(self.cfg.train, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.dist.world_size > 1:
            from shardtune.parallel.launch import init_distributed
            init_distributed(self.dist, self.device)
        # CPU threads per rank: one rule for every command (shardtune/threads.py, measured in docs/cpu.md)
        from shardtune.threads import configure_threads
        configure_threads(on_gpu=self.device.type == "cuda")
        self.dtype = resolve_precision(self.cfg.train, self.device)
        self.cfg = self._plan(self.cfg)
        if self.estimate is not None and self.device.type == "cuda":  # auto: the margin stays free, cache included
            from shardtune.train.budget import hold_to_budget
            self.say(hold_to_budget(self.estimate.usable_bytes, self.device))
        self.strategy = resolve_strategy(self.cfg, self.dist.world_size)

    def _setup_output(self) -> None:
        """output.dir must not hold another run unless this one resumes it or was told to start over. Every rank
        looks before rank 0 changes anything, so they all reach the same verdict."""
        self.out = Path(self.cfg.output.dir)
        o, t = self.cfg.output, self.cfg.train
        found = ckpt.existing_run(self.out)
        self._barrier()
        note = ckpt.prepare_output_dir(self.out, found, t.resume, o.overwrite, delete=self.dist.is_main)
        if note:
            self.say(note)
        self._barrier()
        try:  # every rank, so that all of them stop on an unwritable dir (none waits for the others)
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output.dir={self.out} cannot be created ({e.strerror}); choose a writable "
                              "output.dir") from None

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()

    def _setup_data(self) -> None:
        from shardtune.data.pipeline import build_datasets, collate, format_stats
        from shardtune.model.load import load_tokenizer, read_model_config, resolve_model_dir
        cfg, t = self.cfg, self.cfg.train
        self.model_dir = resolve_model_dir(cfg.model)
        read_model_config(self.model_dir, cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.model.trust_remote_code)
        splits = build_datasets(cfg.data, self.tokenizer, t.seed)
        self.train_set, self.val_set, self.data_stats = splits.train, splits.val, splits.stats
        self.say(format_stats(splits.stats))
        self.collate = lambda samples: collate(samples, self.tokenizer.pad_token_id)
        self.targets = [_targets(s) for s in self.train_set]
        self.global_batch = t.micro_batch_size * t.grad_accum * self.dist.world_size
        if t.max_steps > 0:
            self.total_steps = t.max_steps
        else:
            self.total_steps = max(1, math.ceil(t.epochs * len(self.train_set) / self.global_batch))
        self.batches = GlobalBatches(len(self.train_set), self.global_batch, t.seed)
        self.say(f"shardtune: {t.method} on {self.model_dir.name} | {self.strategy} x{self.dist.world_size} "
                 f"{self.device.type} {str(self.dtype).replace('torch.', '')} | {len(self.train_set)} train / "
                 f"{len(self.val_set)} val samples | global batch {self.global_batch} "
                 f"({t.micro_batch_size} x {t.grad_accum} accum x {self.dist.world_size} ranks) | {self.total_steps} steps")

    def _setup_model(self) -> None:
        """Base + LoRA for this rank (the engine decides how it is built), then the fused kernels."""
        from shardtune.model.kernels import apply_kernels
        from shardtune.model.load import trainable_summary
        torch.manual_seed(self.cfg.train.seed)
        self.engine = make_engine(self.cfg, self.dist, self.device, self.dtype, self.total_steps)
        model = self.engine.build_model(self.model_dir)
        report = getattr(model, "load_report", None)
        if report is not None:
            from shardtune.model.load_report import gather_load_reports
            for r in (gather_load_reports(report) if self.dist.world_size > 1 else [report]):
                self.say("load: " + r.format())
        self.param_counts = trainable_summary(model)
        self.kernels = apply_kernels(model, self.cfg.train.kernels, self.device)
        t = self.cfg.train
        if self.kernels == "liger" and t.gradient_checkpointing and t.checkpoint_policy == "selective":
            from shardtune.model.selective_checkpoint import inplace_rope_hazard
            bad = inplace_rope_hazard(model)
            if bad:
                raise ConfigError(f"train.checkpoint_policy=selective with Liger kernels needs LoRA on q_proj and "
                                  f"k_proj ({bad} has none, and Liger's RoPE rotates its output in place); add them "
                                  "to lora.target_modules, or set train.kernels=none or train.checkpoint_policy=layer")
        self.fused_lora = 0
        if self.cfg.train.fused_lora and self.cfg.train.method != "full" and self.engine.local_module_params:
            from shardtune.model.lora_fused import fuse_lora
            self.fused_lora = fuse_lora(model)
        if self.cfg.train.compile:
            from shardtune.model.compile_layers import compile_layers
            self.say(compile_layers(model, self.device, self.strategy, self.fused_lora))
        self._built = model

    def _setup_engine(self) -> None:
        """The engine wraps or shards the model; the trainer builds the optimizer and schedule and hands them over."""
        t, engine = self.cfg.train, self.engine
        model = engine.wrap(self._built)
        del self._built
        optimizer = None
        if not engine.brings_optimizer:
            optimizer = build_optimizer([p for _, p in engine.named_trainable()], t, engine.optimizer_device,
                                        fused=engine.fused_optimizer)
        self.model = engine.setup(optimizer, lambda opt: build_scheduler(opt, t, self.total_steps))
        del model
        # the fused loss: an engine without wrapper hooks lets the loop call the decoder directly; wrapped engines
        # swap the output layer's forward for one that returns the loss (their hooks keep running)
        self.fused = t.fused_loss and can_fuse(self.model)
        lora = f"; lora dropout: regenerated in backward ({self.fused_lora} layers)" if self.fused_lora else ""
        self.say(f"kernels: {self.kernels}; loss: {'fused' if self.fused else 'logits'}{lora}")
        self.offload = activation_offloader(t.offload_activations, self.device, self.say)
        if self.offload.mover is not None and t.offload_layers is not None:
            from shardtune.model.load import checkpointed_blocks
            base = self.engine.unwrapped()
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            self.say(self.offload.limit_to(checkpointed_blocks(base), t.offload_layers))
        if self.cfg.plan.mode != "auto" and self.device.type == "cuda":
            self._predict(self.cfg)
        trainable, total = self.param_counts
        self.say(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        if self.dist.world_size > 1:
            from shardtune.parallel.balance import check_balance
            check_balance(self.engine, self.cfg.parallel.balance_tolerance)

    def _setup_resume(self) -> None:
        from shardtune.train.checkpointer import Checkpointer
        self.checkpointer = Checkpointer(self.cfg, self.engine, self.dist, self.out, self.tokenizer, self.strategy,
                                         self.say)
        self.start_step = 0
        if not self.cfg.train.resume:
            return
        last = ckpt.latest_checkpoint(self.out, self.say)
        if last is None:
            self.say(f"resume: no complete checkpoint in {self.out / 'checkpoints'}; starting from step 0")
            return
        saved = json.loads((last / ckpt.RUN_FILE).read_text())
        problem = ckpt.resume_problem(saved, self.cfg.to_dict(), self.engine.state_format, self.strategy,
                                      self.dist.world_size)
        if problem:
            raise ConfigError(f"train.resume: cannot continue from {last}: {problem}")
        self.engine.load_checkpoint(last)
        # last, so that nothing after it draws from the restored streams before the first step
        self.start_step = int(ckpt.load_trainer_state(last, self.dist.rank)["step"])
        self.say(f"resume: continuing from {last} (step {self.start_step})")

    def loss_sum(self, batch: dict) -> torch.Tensor:
        if self.fused and self.engine.direct_forward:
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
            try:
                self.setup()
            except torch.OutOfMemoryError as e:
                raise self._out_of_memory(e, "while loading and setting up the model") from None
        self.stops.install()
        self.current_step = self.start_step
        try:
            return self._run()
        except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors (DistBackendError included)
            if isinstance(e, torch.OutOfMemoryError):
                raise self._out_of_memory(e, f"in step {self.current_step + 1}") from None
            if self.dist.world_size > 1 and lost_peer(e):
                last = ckpt.newest_sealed(self.out)
                raise RankLost(f"rank {self.dist.rank}: lost contact with another rank during step "
                               f"{self.current_step + 1} ({str(e).strip().splitlines()[0][:120]}); last complete "
                               f"checkpoint {last or 'none'}; resume with train.resume=true once every rank is back"
                               ) from None
            raise
        finally:
            self.stops.uninstall()

    def _out_of_memory(self, e: Exception, where: str) -> OutOfMemory:
        """One line for a CUDA out-of-memory: where, torch's own first line, how to find a setup that fits, and the
        checkpoint that is kept (an OOM in a step leaves every earlier checkpoint and the adapter dir untouched)."""
        last = ckpt.newest_sealed(self.out) if hasattr(self, "out") else None
        first = first_line(e)
        rank = f"rank {self.dist.rank}: " if getattr(self, "dist", None) and self.dist.world_size > 1 else ""
        return OutOfMemory(f"{rank}out of GPU memory {where} ({first}); `shardtune plan` with the same config shows what "
                           "fits (e.g. train.gradient_checkpointing=true, a smaller train.micro_batch_size, "
                           f"plan.mode=auto); last complete checkpoint: {last or 'none'}")

    def _run(self) -> TrainResult:
        cfg, t, dist, engine = self.cfg, self.cfg.train, self.dist, self.engine
        res = TrainResult(output_dir=self.out)
        finished = (self.out / "adapter").is_dir() and (self.out / "shardtune_run.json").is_file()
        if self.start_step >= self.total_steps and finished:  # resuming a finished run: nothing is rewritten
            self.say(f"resume: the run already reached step {self.start_step} of {self.total_steps}; nothing to do "
                     "(raise train.max_steps to continue it)")
            res.adapter_dir = self.out / "adapter"
            return res
        self.log = log = MetricsLog(self.out, dist.is_main, cfg.output.report_to, start_step=self.start_step,
                                    run_config=cfg.to_dict())
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
        bad_in_a_row = 0
        step = self.start_step
        try:
            for step in range(self.start_step, self.total_steps):
                self.current_step = step
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
                        with self.offload():  # saved activations to pinned CPU memory (CUDA only; else nothing)
                            loss_sum = self.loss_sum(batch)
                        engine.backward(loss_sum / gtargets)
                    step_loss += loss_sum.detach().double()
                    win_tokens += (batch["attention_mask"].sum() if "attention_mask" in batch
                                   else batch["input_ids"].numel())
                # one agreement per step: a stop request on any rank, a non-finite loss on any rank
                stop, bad_loss = self.stops.agree(dist.world_size, not bool(torch.isfinite(step_loss)))
                grad_norm, applied = engine.step(finite_loss=not bad_loss)
                if self.time_steps:
                    self._sync()
                    self.step_times.append(time.perf_counter() - ts)
                done = step + 1
                if not applied and (bad_loss or not engine.loss_scaling):
                    # divergence (a loss scaler's overflow skip is not: it lowers the scale and goes on)
                    bad_in_a_row += 1
                    res.skipped_steps += 1
                    self._bad_step(log, done, step_loss / gtargets, grad_norm, bad_in_a_row)
                    continue
                bad_in_a_row = 0
                # keep the per-step loss on device; summed over ranks only at log points (no host sync per step)
                res.losses.append(step_loss / gtargets)
                win_loss += step_loss
                win_targets += gtargets
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
                periodic = t.save_every > 0 and done % t.save_every == 0
                if periodic or stop or done == self.total_steps:
                    # the last step too: a later run with a larger train.max_steps resumes from it
                    d = self.save_checkpoint(done)
                if stop and done < self.total_steps:
                    raise Stopped(f"stopped by {self.stops.name} at step {done}; checkpoint {d}; "
                                  "resume with train.resume=true")
        except (KeyboardInterrupt, Stopped, Diverged) as e:
            if progress:
                progress.stop()
            if isinstance(e, KeyboardInterrupt):
                last = ckpt.newest_sealed(self.out)
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

    def _bad_step(self, log, done: int, loss, grad_norm, in_a_row: int) -> None:
        """A step whose update was skipped for a non-finite loss or gradient norm: logged; too many in a row stop the
        run (the last checkpoint stays the last good state; no adapter is written)."""
        loss_v = self.engine.all_reduce_sum(torch.as_tensor(loss, device=self.device, dtype=torch.float64)).item()
        gn = float(grad_norm)
        limit = self.cfg.train.max_bad_steps
        log.log(done, skipped_nonfinite=1, loss=loss_v, grad_norm=gn)
        self.say(f"step {done}: loss {loss_v:.4g}, grad_norm {gn:.4g}: update skipped ({in_a_row}/{limit} in a row)")
        if in_a_row >= limit:
            last = ckpt.newest_sealed(self.out)
            raise Diverged(f"training diverged: {in_a_row} steps in a row with a non-finite loss or gradient norm "
                           f"(step {done}: loss {loss_v:.4g}, grad_norm {gn:.4g}); last good checkpoint "
                           f"{last or 'none'}, no adapter written; lower train.lr (now {self.cfg.train.lr:g}), use "
                           "train.precision=bf16 instead of fp16, or set train.grad_clip")
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
        return self.checkpointer.save(step)

    def save_final(self, res: TrainResult) -> Path:
        return self.checkpointer.save_final(res, self.model_dir, self.dtype, self.total_steps, self.data_stats)


def train(cfg, out=print) -> TrainResult:
    return Trainer(cfg, out=out).run()
