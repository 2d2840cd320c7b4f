"""The CPU thread rule (shardtune/threads.py) and quiet output (shardtune/quiet.py)."""

from __future__ import annotations

import warnings

import pytest

from shardtune import threads


@pytest.mark.parametrize("cores,busy,ranks,gpu,want", [
    (2, 0, 1, False, 2),   # idle 2-core machine: both cores
    (2, 2, 1, False, 1),   # two busy processes beside it: one thread (2 spinning threads ran 15x slower)
    (2, 7, 1, False, 1),   # never below one
    (2, 0, 2, False, 1),   # --nproc 2 on 2 cores: one each
    (16, 2, 4, False, 3),  # free cores shared by the ranks
    (16, 12, 2, True, 8),  # GPU runs ignore the load: the CPU only feeds the GPU
])
def test_threads_per_rank(cores, busy, ranks, gpu, want):
    assert threads.threads_per_rank(ranks, gpu, cores=cores, busy=busy) == want


def test_user_setting_wins_and_children_inherit(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = threads.child_thread_env(2, on_gpu=False)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.child_thread_env(2, on_gpu=False)["OMP_NUM_THREADS"] == "2"


def test_configure_threads_sets_torch(monkeypatch):
    import torch
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert threads.configure_threads(local_ranks=1, on_gpu=False) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_usable_cores_is_at_least_one():
    assert threads.usable_cores() >= 1


def test_third_party_warnings_hidden_own_kept(monkeypatch):
    from shardtune.quiet import quiet_libraries
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)  # restored after the test
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        monkeypatch.setattr(warnings, "filters", list(warnings.filters))
        quiet_libraries(debug=False)
        warnings.warn_explicit("deprecated", FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
        warnings.warn_explicit("autograd kernel", UserWarning, "graph.py", 979, module="torch.autograd.graph")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="shardtune.train.loop")
    assert [str(w.message) for w in seen] == ["ours"]
