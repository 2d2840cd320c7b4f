"""The local rank supervisor behind `shardtune train --nproc N [--nnodes M --node-rank R]`: starts this node's ranks,
forwards preemption signals to all of them, and when one rank dies stops the others within a bounded time with one
line naming it. (torchrun, the deepspeed launcher and srun still work: ranks they start train directly.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# after one rank fails, the others get SIGTERM (they stop at once: their next collective fails) and are killed if
# they are still alive after this many seconds
GRACE_S = 30.0
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _die_with_parent() -> None:
    """Runs in each child before exec: if the supervisor is killed (SIGKILL, a lost node), the rank dies with it
    instead of waiting on collectives forever."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def supervise(argv: list[str], nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int,
              env: dict) -> int:
    """Run `python -m shardtune.cli train <argv>` as this node's `nproc` ranks; return the run's exit code."""
    world = nproc * nnodes
    procs = []
    for local in range(nproc):
        rank = node_rank * nproc + local
        child_env = dict(env, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                         LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank), MASTER_ADDR=master_addr,
                         MASTER_PORT=str(master_port))
        procs.append(subprocess.Popen([sys.executable, "-m", "shardtune.cli", "train", *argv], env=child_env,
                                      preexec_fn=_die_with_parent))
    first = node_rank * nproc
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return _wait(procs, first)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _wait(procs: list[subprocess.Popen], first_rank: int) -> int:
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, 75)]
        if bad and failed_at is None:
            i, c = bad[0]
            failed_at = time.monotonic()
            others = any(p.poll() is None for j, p in enumerate(procs) if j != i)
            if c not in (2, 3, 4) and others:  # 2, 3, 4: the rank said why itself
                sys.stderr.write(f"rank {first_rank + i} stopped with {_describe(c)}; stopping the other ranks\n")
                sys.stderr.flush()
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    if all(c in (0, 75) for c in codes):
        return 75
    worst = next(c for c in codes if c not in (0, 75))
    return 128 - worst if worst < 0 else worst
