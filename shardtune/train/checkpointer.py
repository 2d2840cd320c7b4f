"""The trainer's checkpointer: writes a complete, sealed checkpoint of every rank's state and the final adapter
(shardtune.train.checkpoint has the on-disk rules). A trainer component, as in torchtitan: the engine only says how
its own state is stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from shardtune.errors import Diverged, EnvironmentProblem
from shardtune.train import checkpoint as ckpt


class Checkpointer:
    def __init__(self, cfg, engine, dist, out: Path, tokenizer, strategy: str, say):
        self.cfg, self.engine, self.dist, self.out = cfg, engine, dist, out
        self.tokenizer, self.strategy, self.say = tokenizer, strategy, say

    def _refuse_non_finite(self, sd: dict, what: str) -> None:
        bad = ckpt.non_finite(sd) if self.dist.is_main else []
        if self.dist.world_size > 1:
            flag = self.engine.all_reduce_sum(torch.tensor(float(bool(bad)), device=self.engine.device))
            bad = bad or (["(found on rank 0)"] if flag.item() else [])
        if bad:
            raise Diverged(f"{what}: the trainable weights hold non-finite values ({bad[0]}); nothing written; lower "
                           f"train.lr (now {self.cfg.train.lr:g}) or set train.grad_clip")

    def save(self, step: int) -> Path:
        """Every rank writes and fsyncs its files; rank 0 then seals the directory (COMPLETE with every file's hash).
        A checkpoint whose weights hold NaN/inf is never written: the previous one stays the last good state. A disk
        that is full or read-only stops the run with one line; the partial directory is removed."""
        d = ckpt.step_dir(self.out, step)
        try:
            return self._save(step, d)
        except OSError as e:
            shutil.rmtree(d, ignore_errors=True)
            last = ckpt.newest_sealed(self.out)
            raise EnvironmentProblem(f"cannot write checkpoint {d} ({e.strerror or e}); the last complete checkpoint "
                                     f"is {last or 'none'}; free space or make output.dir={self.out} writable, then "
                                     "resume with train.resume=true") from None

    def _save(self, step: int, d: Path) -> Path:
        sd = self.engine.trainable_state_dict()
        self._refuse_non_finite(sd, f"checkpoint at step {step}")
        if self.dist.is_main:
            if d.exists():  # a directory a crash left without its marker
                shutil.rmtree(d)
            d.mkdir(parents=True)
        self.engine.barrier()
        files = self.engine.save_checkpoint(d)
        files += ckpt.save_trainer_state(d, self.dist.rank, step)
        for f in files:
            ckpt.fsync_file(f)
        if self.dist.is_main:
            ckpt.write_json_atomic(d / ckpt.RUN_FILE, {
                "config": self.cfg.to_dict(), "strategy": self.strategy, "world_size": self.dist.world_size,
                "state_format": self.engine.state_format, "step": step})
            ckpt.write_adapter(self.engine.unwrapped(), sd, self.tokenizer, d / "adapter")
        self.engine.barrier()
        if self.dist.is_main:
            ckpt.fsync_dirs(d)  # every rank fsynced the files it wrote; the directory entries are rank 0's
            ckpt.seal(d, step)
            ckpt.prune_checkpoints(self.out)
            self.say(f"checkpoint: {d}")
        self.engine.barrier()
        return d

    def save_final(self, res, model_dir: Path, dtype: torch.dtype, total_steps: int, data_stats) -> Path:
        sd = self.engine.trainable_state_dict()
        self._refuse_non_finite(sd, "final adapter")
        final = self.out / "adapter"
        if self.dist.is_main:
            try:
                ckpt.save_adapter(self.engine.unwrapped(), sd, self.tokenizer, final)
            except OSError as e:
                for tmp in self.out.glob("adapter.tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
                last = ckpt.newest_sealed(self.out)
                raise EnvironmentProblem(f"cannot write the adapter to {final} ({e.strerror or e}); the trained state "
                                         f"is in checkpoint {last or 'none'}; free space or make output.dir writable, "
                                         "then run again with train.resume=true") from None
            ckpt.write_json_atomic(self.out / "shardtune_run.json", {
                "config": self.cfg.to_dict(), "base_model_dir": str(model_dir.resolve()),
                "method": self.cfg.train.method, "precision": str(dtype).replace("torch.", ""),
                "strategy": self.strategy, "world_size": self.dist.world_size, "steps": total_steps,
                "skipped_steps": res.skipped_steps,
                "first_train_loss": res.losses[0] if res.losses else None,
                "final_train_loss": res.losses[-1] if res.losses else None,
                "eval_losses": res.eval_losses, "seconds": round(res.seconds, 2),
                "tokens_per_s": round(res.tokens_per_s, 1), "data": data_stats,
            })
            self.say(f"adapter saved to {final} ({res.seconds:.1f} s, {res.tokens_per_s:.0f} tok/s)")
        self.engine.barrier()
        return final
