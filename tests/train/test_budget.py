"""plan: auto caps the CUDA process at its usable budget (allocated + cached), so torch's cache cannot eat the margin."""

from __future__ import annotations

import types

import torch

from shardtune.train.budget import GiB, hold_to_budget


def test_cap_is_the_usable_share_of_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(total_memory=int(139.8 * GiB)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, dev: calls.append((f, dev)))
    line = hold_to_budget(int(125.8 * GiB), torch.device("cuda", 0))
    (fraction, dev), = calls
    assert abs(fraction * 139.8 - 125.8) < 1e-6 and dev == torch.device("cuda", 0)
    assert "125.8 of the GPU's 139.8 GiB" in line
    calls.clear()
    hold_to_budget(int(200 * GiB), torch.device("cuda", 0))  # planned for a bigger GPU than this one: no cap
    assert calls[0][0] == 1.0

