"""Which samples each rank trains on at each step: step-seeded global batches dealt over ranks and micro steps
(resume needs no sampler state), moved to the device."""

from __future__ import annotations

import numpy as np


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


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}




def targets_of(sample: dict) -> int:
    """Labelled positions the loss scores (labels are shifted by one)."""
    return sum(1 for t in sample["labels"][1:] if t != -100)
