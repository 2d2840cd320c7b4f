"""Preemption: SIGTERM (Slurm, Kubernetes, scancel) and SIGUSR1 (Slurm's --signal) ask the run to stop after the
current optimizer step with a complete checkpoint; a second signal aborts at once. Every rank must stop at the same
step, so the request is agreed over a CPU (gloo) group once per step, together with the step's non-finite flag."""

from __future__ import annotations

import os
import signal
import sys

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self):
        self.signum: int | None = None  # the signal this process received
        self.agreed: int | None = None  # the signal the ranks agreed to stop for (maybe received by another rank)
        self._previous: dict[int, object] = {}
        self._group = None

    def install(self) -> None:
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (embedded use): leave signals alone
                return

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            sys.stderr.write(f"second {signal.Signals(signum).name}: aborting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        s = self.agreed or self.signum
        return signal.Signals(s).name if s else "signal"

    def agree(self, world_size: int, bad_loss: bool) -> tuple[bool, bool]:
        """(stop after this step, some rank's loss is non-finite), the same answer on every rank."""
        local = [float(self.signum or 0), 1.0 if bad_loss else 0.0]
        if world_size <= 1:
            self.agreed = self.signum
            return bool(local[0]), bool(local[1])
        import torch.distributed as dist
        if self._group is None:
            # a CPU group: agreeing costs no GPU sync, and works beside NCCL
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        t = torch.tensor(local, dtype=torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        self.agreed = int(t[0]) or None
        return bool(t[0] > 0), bool(t[1] > 0)


# what gloo and NCCL say when a peer process is gone or stops answering
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "connection refused", "timed out", "timeout",
              "closed by peer", "reset by peer", "remote process exited", "watchdog")


def lost_peer(e: BaseException) -> bool:
    return any(s in str(e).lower() for s in _PEER_GONE)
